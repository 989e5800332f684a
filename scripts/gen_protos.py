"""Generate the Python gRPC code for protos/ into overfill_serve/_proto/ (run after editing a .proto).

`python scripts/gen_protos.py --check` exits 1 when the committed files differ from what the .proto files
generate; the test suite runs it.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "overfill_serve" / "_proto"


def generate(out: Path) -> None:
    from grpc_tools import protoc

    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + files) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        # protoc writes imports relative to protos/ ("from overfill.v1 import x_pb2") and names the message
        # classes' module the same way; make both absolute, or pickling a message (as Ray does) fails.
        text = re.sub(
            r"^from overfill\.", "from overfill_serve._proto.overfill.", path.read_text(), flags=re.M
        )
        text = text.replace("(DESCRIPTOR, 'overfill.", "(DESCRIPTOR, 'overfill_serve._proto.overfill.")
        path.write_text(text)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is out of date")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        return
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        if snapshot(Path(tmp)) != snapshot(OUT):
            print("overfill_serve/_proto is out of date: run python scripts/gen_protos.py", file=sys.stderr)
            raise SystemExit(1)


if __name__ == "__main__":
    main()
