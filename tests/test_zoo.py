"""The model zoo (DeepFM, xDeepFM, DCN, DCN-V2, PNN, MMoE): shapes, parameter counts against the papers'
formulas, gradients to every parameter and the store, training on synthetic data against logistic
regression, and save/load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from terarec.models import (CIN, Batch, DCNConfig, DCNv2Config, DeepFMConfig, DLRMConfig, Embedding, FMInteraction,
                            MMoEConfig, PNNConfig, SparseDenseOptimizer, XDeepFMConfig, build_model, model_spec)
from terarec.core.data.reader import BatchReader, list_split_files
from terarec.core.data.schema import NUM_DENSE, NUM_SPARSE
from terarec.core.data.synth import write_synthetic
from terarec.core.metrics import roc_auc
from terarec.store import DeviceStore, SparseAdagrad, load_store, save_store
from terarec.store.keys import feature_keys

DIM, TASKS = 8, 2
ZOO = ["deepfm", "xdeepfm", "dcn", "dcnv2", "pnn", "mmoe"]
SMALL = {
    "deepfm": DeepFMConfig(deep_mlp=[64, 32]),
    "xdeepfm": XDeepFMConfig(cin_layers=[16, 16], deep_mlp=[64, 32]),
    "dcn": DCNConfig(cross_layers=2, deep_mlp=[64, 32]),
    "dcnv2": DCNv2Config(cross_layers=2, deep_mlp=[64, 32]),
    "pnn": PNNConfig(deep_mlp=[64, 32]),
    "mmoe": MMoEConfig(num_experts=4, expert_mlp=[32], tower_mlp=[16]),
}
VARIANTS = [(name, config) for name, config in SMALL.items()] + [
    ("xdeepfm", XDeepFMConfig(cin_layers=[6, 5, 3], cin_split_half=False, cin_activation="relu", deep_mlp=[16])),
    ("dcn", DCNConfig(cross_layers=3, deep_mlp=[32, 16], structure="stacked")),
    ("dcnv2", DCNv2Config(cross_layers=1, deep_mlp=[16], structure="parallel")),
    ("pnn", PNNConfig(product="outer", deep_mlp=[32])),
    ("pnn", PNNConfig(product="both", deep_mlp=[32, 16])),
]
VARIANT_IDS = [f"{name}-{i}" for i, (name, _) in enumerate(VARIANTS)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small: one intra-op thread trains them in the least CPU time and never spins on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(name, config=None, dim=DIM, num_tasks=TASKS, sparse_lr=0.05, seed=0):
    torch.manual_seed(seed)
    store = DeviceStore(model_spec(name).store_width(dim), SparseAdagrad(lr=sparse_lr), seed=seed)
    return build_model(name, Embedding(store), NUM_DENSE, NUM_SPARSE, config, num_tasks=num_tasks), store


def random_batch(rows=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(rows, NUM_DENSE, generator=gen) * 3, torch.randint(-50, 50, (rows, NUM_SPARSE), generator=gen),
                 (torch.rand(rows, TASKS, generator=gen) < 0.3).float())


def num_tasks_of(name: str) -> int:
    return TASKS if model_spec(name).multi_task else 1


# ---- the papers' parameter counts ---------------------------------------------------------------------------

def mlp_params(sizes):
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))


def expected_params(name, c, D=DIM, F=NUM_SPARSE, n=NUM_DENSE, T=TASKS):
    d0 = F * D + n  # x0 = [e_1..e_F, dense]
    linear = n + 1  # first-order terms: dense weights + global bias (the sparse w_i live in the store)
    if name == "deepfm":  # FM (first order) + DNN; the FM's second order has no dense parameters
        return linear + mlp_params([d0, *c.deep_mlp, 1])
    if name == "xdeepfm":  # xDeepFM eq. 6: W^{k} is H_k x H_{k-1} x m; output unit over p+
        cin, hidden, out = 0, F, 0
        for k, size in enumerate(c.cin_layers):
            cin += size * hidden * F
            last = k == len(c.cin_layers) - 1
            hidden = size if last or not c.cin_split_half else size // 2
            out += size if last or not c.cin_split_half else size - size // 2
        return linear + cin + out + mlp_params([d0, *c.deep_mlp, 1])
    if name in ("dcn", "dcnv2"):  # DCN: w_l, b_l in R^d per layer; DCN-V2: W_l in R^{d x d}, b_l in R^d
        cross = c.cross_layers * ((d0 * d0 if c.matrix else d0) + d0)
        if c.structure == "stacked":
            return cross + mlp_params([d0, *c.deep_mlp, 1])
        return cross + mlp_params([d0, *c.deep_mlp]) + (d0 + c.deep_mlp[-1]) + 1
    if name == "pnn":  # l_z: F*D signals; IPNN: F(F-1)/2 inner products; OPNN: D x D superposed outer product
        products = {"inner": F * (F - 1) // 2, "outer": D * D, "both": F * (F - 1) // 2 + D * D}[c.product]
        return mlp_params([F * D + products + n, *c.deep_mlp, 1])
    if name == "mmoe":  # MMoE eq. 5-6: n experts, per task a gate W_gk in R^{n x d} and a tower
        experts = c.num_experts * mlp_params([d0, *c.expert_mlp])
        return experts + T * d0 * c.num_experts + T * mlp_params([c.expert_mlp[-1], *c.tower_mlp, 1])
    raise KeyError(name)


def test_fm_and_cin_compute_their_equations():
    fields = torch.randn(4, 5, 3)
    pairs = sum((fields[:, i] * fields[:, j]).sum(1) for i in range(5) for j in range(i + 1, 5))
    assert torch.allclose(FMInteraction()(fields).squeeze(1), pairs, atol=1e-5)
    for split_half in (True, False):
        cin = CIN(5, [8, 6, 3], split_half=split_half)
        hidden, pooled = fields, []
        for k, weight in enumerate(cin.weights):  # xDeepFM eq. 6, then sum pooling over D
            maps = torch.einsum("hij,bid,bjd->bhd", weight.view(weight.shape[0], hidden.shape[1], 5), hidden, fields)
            hidden, direct = maps.split(maps.shape[1] // 2, 1) if split_half and k < 2 else (maps, maps)
            pooled.append(direct.sum(2))
        assert torch.allclose(cin(fields), torch.cat(pooled, 1), atol=1e-5)


@pytest.mark.parametrize("name,config", VARIANTS, ids=VARIANT_IDS)
def test_output_shape_and_parameter_count_match_the_paper(name, config):
    model, _ = make_model(name, config)
    batch = random_batch(rows=5)
    assert model(batch).shape == (5, num_tasks_of(name))
    assert sum(p.numel() for p in model.parameters()) == expected_params(name, config)


def test_dlrm_parameter_count_with_the_padded_interaction():
    """DLRM's top MLP reads D + (F+1)F/2 columns rounded up to a multiple of 8 (zero padding for aligned GEMMs)."""
    config = DLRMConfig(bottom_mlp=[32], top_mlp=[64, 16])
    model, _ = make_model("dlrm", config)
    pairs = (NUM_SPARSE + 1) * NUM_SPARSE // 2
    width = -(-(DIM + pairs) // 8) * 8
    assert width == DIM + pairs + 1  # 8 + 351 = 359 -> 360: this shape does pad
    assert model(random_batch(rows=5)).shape == (5, 1)
    assert not model.top_mlp.weights[0][:, DIM + pairs:].any()  # the pad columns' weights: zero, as unpadded
    top = mlp_params([width, 64, 16, 1])
    assert sum(p.numel() for p in model.parameters()) == mlp_params([NUM_DENSE, 32, DIM]) + top


def test_every_zoo_name_builds_with_its_defaults():
    batch = random_batch(rows=3)
    for name in ZOO:
        model, store = make_model(name, config=None)
        assert model(batch).shape == (3, num_tasks_of(name)), name
        assert store.dim == (DIM + 1 if name in ("deepfm", "xdeepfm") else DIM)


def test_first_order_models_split_their_store_rows():
    model, store = make_model("deepfm", SMALL["deepfm"])
    assert store.dim == DIM + 1 and model.dim == DIM
    with pytest.raises(ValueError, match=r"embedding.dim \+ 1"):
        build_model("deepfm", Embedding(DeviceStore(1, SparseAdagrad())), NUM_DENSE, NUM_SPARSE)


def test_configs_reject_bad_values_by_name():
    with pytest.raises(ValueError, match="cin_layer"):
        XDeepFMConfig(cin_layer=[4])
    with pytest.raises(ValueError, match="product"):
        PNNConfig(product="kernel")
    with pytest.raises(ValueError, match="even"):
        make_model("xdeepfm", XDeepFMConfig(cin_layers=[5, 4]))


@pytest.mark.parametrize("name,config", VARIANTS, ids=VARIANT_IDS)
def test_gradients_reach_every_parameter_and_the_store(name, config):
    model, store = make_model(name, config)
    batch = random_batch()
    keys = torch.unique(feature_keys(batch.sparse))
    logits = model(batch)
    before = store.lookup(keys, insert=False).clone()
    F.binary_cross_entropy_with_logits(logits, batch.labels[:, :logits.shape[1]]).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}: no gradient reaches {param_name}"
    SparseDenseOptimizer(model, None).step()
    moved = (store.lookup(keys, insert=False) != before).any(dim=0)
    assert moved.all(), f"{name}: store columns {torch.nonzero(~moved).flatten().tolist()} never changed"


# ---- training on synthetic data ----------------------------------------------------------------------------

TRAIN_ROWS, EPOCHS, BATCH = 100_000, 2, 256


@pytest.fixture(scope="module")
def zoo_data(tmp_path_factory):
    """Synthetic click + conversion data with FM and dense x sparse interactions: train batches and one eval batch."""
    out = str(tmp_path_factory.mktemp("zoo"))
    write_synthetic(out, rows=TRAIN_ROWS, seed=0, cardinality_scale=1e-4, tasks=("click", "conversion"))
    with BatchReader(list_split_files(out, "train"), BATCH, epochs=1, seed=0) as reader:
        train = list(reader)
    eval_files = list_split_files(out, "eval")
    with BatchReader(eval_files, TRAIN_ROWS, epochs=1, shuffle=False, drop_last=False) as reader:
        (evaluation,) = list(reader)
    return train, evaluation


SPARSE_LR = {"mmoe": 0.03}  # Adagrad on the store; 0.05 (LR's best too) unless named here


def train_and_eval(name, config, data, dense_lr=3e-3):
    """EPOCHS passes of Adam (dense) + Adagrad (store); returns eval AUC per task."""
    train, evaluation = data
    model, _ = make_model(name, config, sparse_lr=SPARSE_LR.get(name, 0.05))
    tasks = num_tasks_of(name)
    optimizer = SparseDenseOptimizer(model, torch.optim.Adam(model.parameters(), lr=dense_lr))
    model.train()
    for _ in range(EPOCHS):
        for batch in train:
            loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels[:, :tasks])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model(evaluation)
    return [roc_auc(evaluation.labels[:, task], scores[:, task]) for task in range(tasks)]


@pytest.fixture(scope="module")
def lr_auc(zoo_data):
    """Logistic regression's eval AUC per task (one LR per label column)."""
    train, evaluation = zoo_data
    per_task = []
    for task in range(TASKS):
        pick = [Batch(b.dense, b.sparse, b.labels[:, task:task + 1]) for b in train]
        single = Batch(evaluation.dense, evaluation.sparse, evaluation.labels[:, task:task + 1])
        per_task.append(train_and_eval("lr", None, (pick, single))[0])
    return per_task


# Measured: click AUC 0.743 (LR) against 0.757 (MMoE) to 0.792 (DeepFM); the oracle scores 0.842. On the
# conversion task MMoE leads LR by about 0.010 (0.806 against 0.796): that task is held to half the margin.
MARGIN = {0: 0.01, 1: 0.005}


@pytest.mark.parametrize("name", ZOO)
def test_training_beats_logistic_regression(name, zoo_data, lr_auc):
    aucs = train_and_eval(name, SMALL[name], zoo_data)
    for task, auc in enumerate(aucs):
        assert auc > lr_auc[task] + MARGIN[task], f"{name} task {task}: AUC {auc:.4f} vs LR {lr_auc[task]:.4f}"


@pytest.mark.parametrize("name", ZOO)
def test_save_and_load_give_identical_predictions(name, zoo_data, tmp_path):
    train, evaluation = zoo_data
    model, store = make_model(name, SMALL[name])
    optimizer = SparseDenseOptimizer(model, torch.optim.Adam(model.parameters(), lr=3e-3))
    for batch in train[:20]:
        logits = model(batch)
        F.binary_cross_entropy_with_logits(logits, batch.labels[:, :logits.shape[1]]).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    save_store(store, str(tmp_path / "store.pt"))

    loaded, loaded_store = make_model(name, SMALL[name], seed=1)
    loaded.load_state_dict(torch.load(tmp_path / "dense.pt", weights_only=True))
    assert load_store(loaded_store, [str(tmp_path / "store.pt")]) == len(store)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(evaluation), loaded(evaluation))
