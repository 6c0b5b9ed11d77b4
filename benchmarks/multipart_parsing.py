"""How long one multipart/form-data body holds the parser: the stdlib e-mail parser the service used
before `twinflow.serve.uploads`, against the streaming parser with its caps (refusal) and without them
(every part parsed), for bodies of N one-byte fields. Writes benchmarks/results/multipart_parsing.json;
docs/security.md quotes it.

    PYTHONPATH=platform .venv/bin/python benchmarks/multipart_parsing.py [--parts 5000,20000,40000,100000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

from twinflow.serve.uploads import FormLimits, FormTooLarge, StreamingForm

BOUNDARY = "f"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
CHUNK = 64 * 1024  # what the ASGI server hands the app per message, about


def body_of(parts: int) -> bytes:
    one = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="a{{}}"\r\n\r\nx\r\n'
    return "".join(one.format(i) for i in range(parts)).encode() + f"--{BOUNDARY}--\r\n".encode()


def stdlib_seconds(body: bytes) -> float:
    """The replaced parser: the whole body through email's BytesParser, then every part walked."""
    t0 = time.perf_counter()
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + CTYPE.encode() + b"\r\n\r\n" + body)
    for part in msg.iter_parts():
        part.get_param("name", header="content-disposition")
        part.get_payload(decode=True)
    return time.perf_counter() - t0


def streaming_seconds(body: bytes, limits: FormLimits) -> tuple[float, str]:
    t0 = time.perf_counter()
    form = StreamingForm(CTYPE, limits)
    outcome = "parsed"
    try:
        for i in range(0, len(body), CHUNK):
            form.feed(body[i : i + CHUNK])
        form.result()
    except FormTooLarge:
        outcome = "refused (413)"
    return time.perf_counter() - t0, outcome


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="5000,20000,40000,100000")
    p.add_argument("--stdlib-max", type=int, default=20000, help="skip the stdlib parser above this")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "multipart_parsing.json"))
    args = p.parse_args()
    rows = []
    for n in (int(v) for v in args.parts.split(",")):
        body = body_of(n)
        capped, outcome = streaming_seconds(body, FormLimits())
        uncapped, _ = streaming_seconds(body, FormLimits(max_parts=n + 1))
        row = {
            "parts": n,
            "bytes": len(body),
            "streaming_capped_s": round(capped, 5),
            "streaming_capped_outcome": outcome,
            "streaming_uncapped_s": round(uncapped, 3),
            "stdlib_s": round(stdlib_seconds(body), 3) if n <= args.stdlib_max else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "PYTHONPATH=platform .venv/bin/python benchmarks/multipart_parsing.py "
                f"--parts {args.parts} --stdlib-max {args.stdlib_max}",
                "python": platform.python_version(),
                "machine": f"{platform.machine()}, shared 2-core CI-class VM",
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
