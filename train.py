"""`python train.py --config configs/<recipe>.py --workdir DIR [--config.key=value ...]`: pre-train or fine-tune.

The command line lives in `gpt1_jax.train_cli` (also installed as `gpt1-train`); `--help` lists the flags.
"""

from gpt1_jax import train_cli

if __name__ == "__main__":
    train_cli.main()
