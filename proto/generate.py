"""Regenerate the Python gRPC stubs in proto/ from the .proto files.

Run `python proto/generate.py` after editing a .proto file; the test suite
checks that the committed stubs are exactly what this produces.
"""
import pathlib
import shutil
import sys
import tempfile

PROTO_DIR = pathlib.Path(__file__).resolve().parent
PROTOS = ("inference.proto",)   # the supervisor <-> worker hop is proto/hop.py, not gRPC


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write the generated *_pb2*.py files into out_dir and return their paths."""
    from grpc_tools import protoc  # a build/test dependency only

    with tempfile.TemporaryDirectory() as tmp:
        # Map proto/ to the virtual path sealbox/proto so the generated
        # imports read `from sealbox.proto import inference_pb2`.
        args = ["protoc", f"-Isealbox/proto={PROTO_DIR}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        args += [f"{PROTO_DIR}/{name}" for name in PROTOS]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on " + ", ".join(PROTOS))
        written = []
        for path in sorted((pathlib.Path(tmp) / "sealbox" / "proto").iterdir()):
            target = out_dir / path.name
            shutil.copyfile(path, target)
            written.append(target)
        return written


if __name__ == "__main__":
    for path in generate(PROTO_DIR):
        print("wrote", path, file=sys.stderr)
