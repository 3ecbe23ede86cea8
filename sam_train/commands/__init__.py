"""One module per `sam-train` command, each with `main(cfg)`: the only layer that turns a composed Hydra
config into objects (`commands.build`) and calls the library with typed arguments."""
