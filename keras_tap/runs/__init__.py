"""Config-driven runs: configs, data, model sources, run directories and the
`keras-tap` command line."""
