"""The `unet-edge` command line (installed as the `unet_edge_cli` package)."""
