"""CPU demo recipe (placeholder until the full demo lands): checks the workspace imports and writes a file."""

import json
from pathlib import Path

import rcm_kernels
import rcm_losses
import rcm_nets
import rcm_train


def main() -> None:
    out = Path("outputs/demo")
    out.mkdir(parents=True, exist_ok=True)
    info = {m.__name__: sorted(m.__all__) for m in (rcm_kernels, rcm_nets, rcm_losses, rcm_train)}
    (out / "smoke.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {out / 'smoke.json'}")


if __name__ == "__main__":
    main()
