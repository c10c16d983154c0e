"""rcm_losses: see the package README and DESIGN.md for the public surface."""

__all__: list[str] = []
