"""`python -m keras_tap ...` is the `keras-tap` command line."""

from keras_tap.runs.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
