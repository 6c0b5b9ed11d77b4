from twinflow.data.cli import main_data

raise SystemExit(main_data())
