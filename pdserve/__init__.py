"""pdserve: disaggregated prefill/decode LLM serving. The CLI lives in pdserve.cli.

Layers, each importing only the ones below it (tests/test_layers.py checks):
    cli, cluster, bench, goodput, demo, client       what users run
    coordinator | prefill_node, decode_node, colocated_node   the role servers
    node                                             what every engine-running node shares
    kv_transfer                                      KV transports
    engine                                           model execution
    wire, common, v1                                 gRPC stubs and helpers; torch-free shared code
The wheel installs every package under pdserve/; a source checkout keeps the role,
engine and transport packages at the repository root, so the search path covers both."""
from pathlib import Path as _Path

__version__ = "0.1.0"

_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "engine" / "__init__.py").is_file():
    __path__.append(str(_root))
