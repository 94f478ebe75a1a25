"""The benchmarks, apart from the teaching modules: bench.py (the table, run as `python -m bench.bench` from the
repository root), bench_peers.py (the rows against TRL and llm-blender), peer_runner.py (the peers' side, run under
their own interpreters) and workloads.py (the inputs and the one timing rule). See docs/benchmarks.md."""
