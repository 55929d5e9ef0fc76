"""The recipes: ml_collections config files, one per recipe, given to `train.py --config configs/NAME.py[:ARG]`.

They ship inside the package, so `--config configs/finetune.py:sst2` names them from any directory
(`gpt1_jax.recipe_flags`); a recipe file imports only `common` and `gpt1_jax.constants`, never the training stack.
"""
