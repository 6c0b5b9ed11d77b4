from twinflow.cli import main

raise SystemExit(main())
