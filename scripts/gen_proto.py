"""Regenerate the protobuf modules under pagehaul/ from proto/, or check they are current.

    python scripts/gen_proto.py          # rewrite pagehaul/**/*_pb2.py(i)
    python scripts/gen_proto.py --check  # exit 1 if the committed files differ from fresh output

The generator is grpcio-tools' bundled protoc (pinned in pyproject's dev extra), so the output
depends only on that version and the .proto files.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every .proto under proto/ and return the generated files (relative)."""
    sources = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", *sources,
    ]
    subprocess.run(cmd, check=True)
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*_pb2.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        produced = generate(out)
        committed = sorted(p.relative_to(ROOT) for p in (ROOT / "pagehaul").rglob("*_pb2.py*"))
        if args.check:
            stale = [str(p) for p in produced if not (ROOT / p).exists()
                     or not filecmp.cmp(out / p, ROOT / p, shallow=False)]
            stale += [str(p) for p in committed if p not in produced]
            if stale:
                print("generated protobuf code is stale; run: python scripts/gen_proto.py", file=sys.stderr)
                for name in stale:
                    print(f"  {name}", file=sys.stderr)
                return 1
            print(f"generated protobuf code is current ({len(produced)} files)")
            return 0
        for rel in produced:
            (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, ROOT / rel)
        for rel in committed:
            if rel not in produced:
                (ROOT / rel).unlink()
        print(f"wrote {len(produced)} files")
        return 0


if __name__ == "__main__":
    sys.exit(main())
