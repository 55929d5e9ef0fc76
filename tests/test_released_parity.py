"""Fine-tuning takes the released code's steps (finetune-transformer-lm train.py, opt.py): loss, gradients, updates.

The reference below is written in PyTorch (float64) from the released code's formulas alone: its single
table `we` = [BPE | specials | positions], `model()`'s post-LN blocks, the per-sequence LM loss over
the whole table, the classifier read at `_classify_`, `train_loss = mean(clf) + lm_coef * mean(lm)`,
`clip_by_global_norm`, `opt.adam` and `warmup_linear`. It never calls our loss, model or optimizer: it
reads the release's npy files itself and takes from our side only the freshly drawn parameters (the
three special-token rows and W_y) and the token ids of the batch, which it checks against its own
`transform_roc`.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from gpt1_jax import convert, run_options
from gpt1_jax.configs import finetune as finetune_recipe
from gpt1_jax.finetuning import finetune, finetune_start, task_inputs, tasks
from gpt1_jax.model.heads import TaskModel, task_loss
from gpt1_jax.text.tokenizer import CLASSIFY_ID, DELIMITER_ID, START_ID, GPT1Tokenizer
from gpt1_jax.training import optim, train_lib

WIDTH, N_LAYER, N_HEAD, N_CTX, VOCAB, N_SPECIAL = 128, 2, 2, 128, 40478, 3
BATCH = 8
LAYER_SHAPES = [(1, WIDTH, 3 * WIDTH), (3 * WIDTH,), (1, WIDTH, WIDTH), (WIDTH,), (WIDTH,), (WIDTH,),
                (1, WIDTH, 4 * WIDTH), (4 * WIDTH,), (1, 4 * WIDTH, WIDTH), (WIDTH,), (WIDTH,), (WIDTH,)]
# Our stacked-block paths in the release's per-layer order (c_attn, attn c_proj, ln_1, c_fc, mlp c_proj, ln_2).
OUR_LAYER_PATHS = [("attn", "qkv", "kernel"), ("attn", "qkv", "bias"), ("attn", "proj", "kernel"),
                   ("attn", "proj", "bias"), ("ln_1", "scale"), ("ln_1", "bias"), ("mlp", "fc", "kernel"),
                   ("mlp", "fc", "bias"), ("mlp", "proj", "kernel"), ("mlp", "proj", "bias"),
                   ("ln_2", "scale"), ("ln_2", "bias")]
TOTAL_UPDATES = 1000  # the schedule's t_total: updates 0-2 cover warm-up (0.2%) and its (1 - x) factor


# ---------------------------------------------------------------- the released code, as a reference


def write_release(directory) -> list[np.ndarray]:
    """Random weights in the released npy layout: params_shapes.json and the flat values in 10 shards."""
    shapes = [(N_CTX, WIDTH), (VOCAB, WIDTH)] + LAYER_SHAPES * N_LAYER
    rng = np.random.default_rng(0)
    arrays = [(0.02 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    for i, s in enumerate(shapes):  # LayerNorm gains near 1 and non-zero biases, so every term is exercised
        if len(s) == 1:
            arrays[i] = (arrays[i] + (1.0 if (i - 2) % 12 in (4, 10) else 0.0)).astype(np.float32)
    flat = np.concatenate([a.reshape(-1) for a in arrays])
    (directory / "params_shapes.json").write_text(json.dumps([list(s) for s in shapes]))
    for i, shard in enumerate(np.array_split(flat, 10)):
        np.save(directory / f"params_{i}.npy", shard)
    return arrays


def release_transform_roc(x1, x2, x3, n_ctx):
    """train.py `transform_roc`: xmb [batch, 2, n_ctx, 2] (token, position id), mmb [batch, 2, n_ctx]."""
    max_len = N_CTX // 2 - 2
    xmb = np.zeros((len(x1), 2, n_ctx, 2), np.int64)
    mmb = np.zeros((len(x1), 2, n_ctx), np.float64)
    for i, (a, b, c) in enumerate(zip(x1, x2, x3)):
        for j, ending in enumerate((b, c)):
            row = [START_ID] + list(a[:max_len]) + [DELIMITER_ID] + list(ending[:max_len]) + [CLASSIFY_ID]
            xmb[i, j, :len(row), 0] = row
            mmb[i, j, :len(row)] = 1
    xmb[:, :, :, 1] = np.arange(VOCAB + N_SPECIAL, VOCAB + N_SPECIAL + n_ctx)
    return xmb, mmb


class ReleasedModel:
    """train.py `model()` in float64 PyTorch; parameters in the release's layout (we, per-layer conv weights, clf)."""

    def __init__(self, arrays: list[np.ndarray], specials: np.ndarray, clf_w: np.ndarray, clf_b: np.ndarray,
                 n_ctx: int):
        as_t = lambda a: torch.tensor(np.asarray(a, np.float64), requires_grad=True)  # noqa: E731
        we = np.concatenate([arrays[1], specials, arrays[0][:n_ctx]])  # train.py: [tokens | specials | positions]
        self.params = {"we": as_t(we), "clf_w": as_t(clf_w), "clf_b": as_t(clf_b)}
        for layer in range(N_LAYER):
            for k in range(12):
                self.params[f"h{layer}_{k}"] = as_t(arrays[2 + 12 * layer + k])

    @staticmethod
    def _norm(x, g, b):
        u = x.mean(-1, keepdim=True)
        s = ((x - u) ** 2).mean(-1, keepdim=True)
        return (x - u) * torch.rsqrt(s + 1e-5) * g + b

    def _block(self, x, layer):
        p = [self.params[f"h{layer}_{k}"] for k in range(12)]
        conv = lambda h, w, b: h @ w[0] + b  # noqa: E731  (rf == 1 conv1d)
        batch, seq, _ = x.shape
        q, k, v = conv(x, p[0], p[1]).split(WIDTH, dim=-1)
        heads = lambda t: t.reshape(batch, seq, N_HEAD, WIDTH // N_HEAD).transpose(1, 2)  # noqa: E731
        w = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(WIDTH // N_HEAD)
        band = torch.tril(torch.ones(seq, seq, dtype=torch.float64))
        w = torch.softmax(w * band - 1e9 * (1 - band), dim=-1)
        a = (w @ heads(v)).transpose(1, 2).reshape(batch, seq, WIDTH)
        n = self._norm(x + conv(a, p[2], p[3]), p[4], p[5])
        h = conv(n, p[6], p[7])
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        return self._norm(n + conv(h, p[8], p[9]), p[10], p[11])

    def losses(self, xmb, mmb, ymb, softmax_rows=None):
        """(clf_logits [batch, 2], clf_losses [batch], lm_losses [batch * 2]) as train.py `model` returns them."""
        we = self.params["we"]
        x = torch.from_numpy(xmb).reshape(-1, xmb.shape[2], 2)
        m = torch.from_numpy(mmb).reshape(-1, mmb.shape[2])
        h = we[x].sum(2)
        for layer in range(N_LAYER):
            h = self._block(h, layer)
        head = we if softmax_rows is None else we[:softmax_rows]
        lm_logits = h[:, :-1].reshape(-1, WIDTH) @ head.T
        lm = torch.nn.functional.cross_entropy(lm_logits, x[:, 1:, 0].reshape(-1), reduction="none")
        lm = lm.reshape(x.shape[0], -1)
        lm_losses = (lm * m[:, 1:]).sum(1) / m[:, 1:].sum(1)
        pool = (x[:, :, 0] == CLASSIFY_ID).double().argmax(1)
        clf_h = h.reshape(-1, WIDTH)[torch.arange(x.shape[0]) * x.shape[1] + pool]
        clf_logits = (clf_h @ self.params["clf_w"] + self.params["clf_b"]).reshape(-1, 2)
        clf_losses = torch.nn.functional.cross_entropy(clf_logits, torch.from_numpy(ymb), reduction="none")
        return clf_logits, clf_losses, lm_losses

    def train_loss(self, xmb, mmb, ymb, lm_coef):
        _, clf_losses, lm_losses = self.losses(xmb, mmb, ymb)
        return clf_losses.mean() + lm_coef * lm_losses.mean()

    def gradients(self, xmb, mmb, ymb, lm_coef) -> dict[str, np.ndarray]:
        names = list(self.params)
        grads = torch.autograd.grad(self.train_loss(xmb, mmb, ymb, lm_coef), [self.params[n] for n in names])
        return {n: g.numpy() for n, g in zip(names, grads)}

    def adam_steps(self, xmb, mmb, ymb, *, lm_coef, steps, opt):
        """opt.py `adam` with `warmup_linear`, after clip_by_global_norm, for `steps` updates on one batch."""
        values = {n: p.detach().numpy().copy() for n, p in self.params.items()}
        m = {n: np.zeros_like(v) for n, v in values.items()}
        v2 = {n: np.zeros_like(v) for n, v in values.items()}
        for t in range(steps):
            grads = self.gradients(xmb, mmb, ymb, lm_coef)
            norm = math.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
            grads = {n: g * opt.grad_clip_norm / max(norm, opt.grad_clip_norm) for n, g in grads.items()}
            x = t / TOTAL_UPDATES
            s = float(x <= opt.warmup_fraction)
            lrt = opt.lr * math.sqrt(1 - opt.b2 ** (t + 1)) / (1 - opt.b1 ** (t + 1))
            lrt *= (s * (x / opt.warmup_fraction) + (1 - s)) * (1 - x)
            for n, g in grads.items():
                m[n] = opt.b1 * m[n] + (1 - opt.b1) * g
                v2[n] = opt.b2 * v2[n] + (1 - opt.b2) * g * g
                step = m[n] / (np.sqrt(v2[n]) + opt.eps)
                if values[n].ndim > 1:
                    step = step + opt.weight_decay * values[n]
                values[n] = values[n] - lrt * step
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(torch.from_numpy(values[n]))
        return values


# ---------------------------------------------------------------- our side


@pytest.fixture(scope="module")
def setup(tmp_path_factory, data_root):
    """The release imported with `convert --openai`, fine-tuning parameters from it, one Story Cloze batch."""
    release = tmp_path_factory.mktemp("release")
    arrays = write_release(release)
    converted = tmp_path_factory.mktemp("converted") / "ckpt"
    convert.main(["--openai", str(release), "--orbax", str(converted), "--n-head", str(N_HEAD)])
    config = finetune_recipe.get_config("story_cloze")
    config.init = str(converted)
    config.data.task_source = "local"
    config.model.update(embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
    config.finetune.clf_dropout = 0.0
    config.train.batch_size = BATCH
    spec = tasks.get_task("story_cloze")
    model_cfg, params, _ = finetune_start.build_params(config, spec, seed=0)
    assert (model_cfg.width, model_cfg.n_layer, model_cfg.n_head, model_cfg.n_ctx) == (WIDTH, N_LAYER, N_HEAD, N_CTX)

    stories = task_inputs.read_split(spec, "validation", run_options.task_data_options(config))[:BATCH]
    encoded = task_inputs.encode_examples(stories, GPT1Tokenizer.from_files().encode_batch)
    seq = task_inputs.context_length(encoded, spec.kind, N_CTX)
    arrays_in = task_inputs.build_inputs(encoded, spec.kind, N_CTX, seq_len=seq)
    batch = next(task_inputs.batches(arrays_in, BATCH))
    xmb, mmb = release_transform_roc([e.a for e in encoded], [e.choices[0] for e in encoded],
                                     [e.choices[1] for e in encoded], seq)
    np.testing.assert_array_equal(batch["tokens"], xmb[..., 0])  # our transformation is the release's
    np.testing.assert_array_equal(batch["mask"], mmb)
    backbone = params["backbone"]
    specials = np.asarray(backbone["tokens_embed"][VOCAB:VOCAB + N_SPECIAL])
    head = params["head"]["dense"]
    reference = ReleasedModel(arrays, specials, np.asarray(head["kernel"]), np.asarray(head["bias"]), seq)
    return dict(config=config, spec=spec, model_cfg=model_cfg, params=params, batch=batch, xmb=xmb, mmb=mmb,
                ymb=batch["labels"].astype(np.int64), reference=reference, seq=seq)


def release_layout(params: dict, seq: int) -> dict[str, np.ndarray]:
    """Our parameter (or gradient) tree in the reference's names and shapes; position rows past `seq`
    have no counterpart in the release, whose table keeps only the run's context."""
    backbone = params["backbone"]
    out = {"we": np.concatenate([np.asarray(backbone["tokens_embed"][:VOCAB + N_SPECIAL]),
                                 np.asarray(backbone["positions_embed"][:seq])]),
           "clf_w": np.asarray(params["head"]["dense"]["kernel"]), "clf_b": np.asarray(params["head"]["dense"]["bias"])}
    for layer in range(N_LAYER):
        for k, path in enumerate(OUR_LAYER_PATHS):
            value = backbone["blocks"]
            for key in path:
                value = value[key]
            out[f"h{layer}_{k}"] = np.asarray(value[layer]).reshape(LAYER_SHAPES[k])
    return out


def our_model(setup) -> TaskModel:
    abstract = finetune_start.abstract_model(setup["model_cfg"], setup["spec"], 0.0)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, setup["params"]))
    return nnx.merge(graphdef, state)


# W_y's bias of a multiple-choice head adds the same amount to every answer's logit, so the softmax over
# answers cancels it: its gradient is 0 in exact arithmetic, and float round-off (1e-9 here, 1e-17 in the
# float64 reference) is all either side computes. It is checked to be ~0, not compared.
ZERO_GRADIENT = "clf_b"


def relative(ours, ref) -> float:
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


# ---------------------------------------------------------------- the tests


def real_targets(batch) -> int:
    """The slots L1's gather needs to score this batch's real tokens alone (`finetune.needed_lm_target_slots`)."""
    return int(np.asarray(batch["mask"])[:, :, 1:].sum())


@pytest.mark.parametrize("gather", [False, True], ids=["every position", "real targets only"])
def test_losses_match_the_released_code(setup, gather):
    model, batch, ref = our_model(setup), setup["batch"], setup["reference"]
    slots = real_targets(batch) if gather else 0
    with torch.no_grad():
        clf_logits, clf_losses, lm_losses = ref.losses(setup["xmb"], setup["mmb"], setup["ymb"])
        _, _, lm_tokens_only = ref.losses(setup["xmb"], setup["mmb"], setup["ymb"], softmax_rows=VOCAB + N_SPECIAL)
    outputs, hidden = model(batch["tokens"], batch["classify_positions"])
    assert relative(outputs, clf_logits.numpy()) < 1e-5
    per_row = model.row_lm_losses(hidden, batch["tokens"], batch["mask"], target_slots=slots)  # L1 per sequence
    assert relative(np.asarray(per_row).reshape(-1), lm_losses.numpy()) < 1e-5
    tokens_only = model.row_lm_losses(hidden, batch["tokens"], batch["mask"], softmax_rows="tokens",
                                      target_slots=slots)
    assert relative(np.asarray(tokens_only).reshape(-1), lm_tokens_only.numpy()) < 1e-5
    l3, aux = task_loss(model, batch, None, lm_coef=0.5, lm_target_slots=slots)
    assert relative(aux["task_loss"], clf_losses.mean().numpy()) < 1e-5  # L2
    assert relative(aux["lm_loss"], lm_losses.mean().numpy()) < 1e-5  # L1
    assert relative(l3, (clf_losses.mean() + 0.5 * lm_losses.mean()).numpy()) < 1e-5  # L3


@pytest.mark.parametrize("gather", [False, True], ids=["every position", "real targets only"])
def test_gradients_of_l3_match_the_released_code_for_every_parameter(setup, gather):
    batch, ref = setup["batch"], setup["reference"]
    graphdef, _ = nnx.split(our_model(setup))
    slots = real_targets(batch) if gather else 0

    def loss(params):
        return task_loss(nnx.merge(graphdef, params), batch, None, lm_coef=0.5, lm_target_slots=slots)[0]

    grads = release_layout(jax.grad(loss)(jax.tree.map(jnp.asarray, setup["params"])), setup["seq"])
    expected = ref.gradients(setup["xmb"], setup["mmb"], setup["ymb"], 0.5)
    assert set(grads) == set(expected) and len(grads) == 3 + 12 * N_LAYER
    errors = {name: relative(grads[name], expected[name]) for name in expected if name != ZERO_GRADIENT}
    assert max(errors.values()) < 1e-5, errors
    assert np.abs(grads[ZERO_GRADIENT]).max() < 1e-7 and np.abs(expected[ZERO_GRADIENT]).max() < 1e-7


def test_three_updates_match_the_released_optimizer_and_schedule(setup):
    config, batch, ref = setup["config"], setup["batch"], setup["reference"]
    initial = release_layout(setup["params"], setup["seq"])
    graphdef, _ = nnx.split(our_model(setup))
    schedule = optim.learning_rate_schedule(run_options.optimizer_options(config), TOTAL_UPDATES)
    optimizer = optim.make_optimizer(run_options.optimizer_options(config), TOTAL_UPDATES, setup["params"])
    loss = finetune.make_task_loss(config)(graphdef)
    step = jax.jit(train_lib.make_train_step(loss, optimizer, schedule, run_options.loop_options(config)))
    state = train_lib.init_state(jax.tree.map(jnp.asarray, setup["params"]), optimizer)
    inputs = {k: batch[k] for k in finetune.TRAIN_KEYS}
    lrs = []
    for _ in range(3):
        state, metrics = step(state, inputs)
        lrs.append(float(metrics["lr"]))
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(6.25e-5 * 0.5 * (1 - 1 / TOTAL_UPDATES), rel=1e-6)
    ours = release_layout(jax.device_get(state.params), setup["seq"])
    initial_grads = ref.gradients(setup["xmb"], setup["mmb"], setup["ymb"], 0.5)  # before adam_steps moves them
    expected = ref.adam_steps(setup["xmb"], setup["mmb"], setup["ymb"], lm_coef=0.5, steps=3, opt=config.optimizer)
    for name, want in expected.items():
        if name == ZERO_GRADIENT:
            continue
        update = np.abs(want - initial[name]).max()
        # Three float32 additions to a stored value each round by up to half a unit in the last place: 1e-3 of
        # an update of ~1e-4 is below one ulp of a LayerNorm gain near 1 (6e-8), so that rounding is allowed.
        rounding = 1.5 * np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        # Our float32 gradients round off by ~1e-5 of a tensor's typical gradient (the test above bounds it in
        # norm). Adam divides each element's step by that element's own gradient, so an element whose gradient
        # is far below typical (a sign about to flip) takes that round-off into its step magnified by rms/|g|:
        # one such element of an MLP projection is 1.04e-3 of the largest update on some CPUs. Capped at 10%,
        # so a wrong schedule, bias correction or eps placement (each off by far more) still fails everywhere.
        grad = np.abs(initial_grads[name])
        magnified = np.minimum(1e-5 * np.sqrt(np.mean(grad ** 2)) / np.maximum(grad, 1e-30), 0.1)
        assert update > 0, name
        assert np.all(np.abs(ours[name] - want) <= (1e-3 + magnified) * update + rounding), name
