"""The `ddpm-landmarks` command line: one module per command family, each a thin wrapper that
parses arguments and calls the layers below."""
