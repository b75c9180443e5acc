"""The vmmu.v1 wire contract: the .proto files and the code `scripts/gen_protos.py`
generates from them (committed, checked for drift in CI)."""
