"""FedRot-LoRA, Fed-SB (with the LoRA-SB adapter), FedSA's mirror image (``method.share = "B"``) and the relation of
HLoRA's mixed-rank reconstruction to FlexLoRA / FLoRA-NA.

First the server rules of ``fedlora.functional`` against numpy references on small random layers, in float32 and
float64, and at d = k = 200,000 (no d×k matrix); then the methods in real rounds of the embedded runtime on tiny-bert.
Conformance (resume, Flower, saved = evaluated) is in test_conformance.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fedlora import functional as F
from fedlora.adapters import role
from fedlora.errors import ConfigError
from test_methods import expected_mean, recorded_rounds
from test_more_methods import dense_ideal, layer, rel

TOL = [(torch.float64, 1e-12), (torch.float32, 2e-5)]


def np_procrustes(X: np.ndarray, ref: np.ndarray, side: str) -> np.ndarray:
    """The textbook orthogonal Procrustes solution (Schönemann 1966), for the reference."""
    M = X @ ref.T if side == "A" else X.T @ ref
    U, _, Vt = np.linalg.svd(M)
    return U @ Vt


def rotated_copies(n: int = 3, d: int = 12, k: int = 9, r: int = 3, noise: float = 0.0, seed: int = 1,
                   dtype: torch.dtype = torch.float64):  # type: ignore[no-untyped-def]
    """Clients that learned one update (B0, A0) in different latent frames Q_u (plus ``noise``), and the reference
    (B0, A0): the case rotational misalignment describes."""
    g = torch.Generator().manual_seed(seed)
    B0, A0 = torch.randn(d, r, generator=g, dtype=torch.float64), torch.randn(r, k, generator=g, dtype=torch.float64)
    Bs, As = [], []
    for _ in range(n):
        Q = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64)).Q
        Bs.append((B0 @ Q + noise * torch.randn(d, r, generator=g, dtype=torch.float64)).to(dtype))
        As.append((Q.T @ A0 + noise * torch.randn(r, k, generator=g, dtype=torch.float64)).to(dtype))
    return Bs, As, B0.to(dtype), A0.to(dtype)


# ---- FedRot-LoRA ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["A", "B"])
@pytest.mark.parametrize("dtype,tol", TOL)
def test_alignment_is_procrustes_and_leaves_every_product_unchanged(side: str, dtype: torch.dtype, tol: float) -> None:
    Bs, As, w = layer(dtype=dtype)
    B_ref, A_ref = Bs[0] * 0.5 + 0.1, As[0] * 0.5 - 0.1
    new_B, new_A = F.fedrot_align(Bs, As, B_ref, A_ref, side)
    for B, A, B2, A2 in zip(Bs, As, new_B, new_A):
        assert B2.dtype == A2.dtype == dtype
        X, ref = (A, A_ref) if side == "A" else (B, B_ref)
        R = np_procrustes(X.double().numpy(), ref.double().numpy(), side)
        np.testing.assert_allclose(B2.double().numpy(), B.double().numpy() @ R, atol=10 * tol)
        np.testing.assert_allclose(A2.double().numpy(), R.T @ A.double().numpy(), atol=10 * tol)
        assert rel(B2.double().numpy() @ A2.double().numpy(), B.double().numpy() @ A.double().numpy()) < tol
    # the ideal update Σ p_u B_u A_u is the same before and after
    assert rel(dense_ideal(new_B, new_A, w), dense_ideal(Bs, As, w)) < tol


@pytest.mark.parametrize("side", ["A", "B"])
@pytest.mark.parametrize("dtype,tol", TOL)
def test_alignment_lowers_the_averaging_error_of_misaligned_clients(side: str, dtype: torch.dtype, tol: float) -> None:
    Bs, As, B0, A0 = rotated_copies(dtype=dtype)
    w = [1.0, 2.0, 3.0]
    ideal = dense_ideal(Bs, As, w)  # = B0·A0: every client has the same update
    fedit = rel(np.asarray(F.fedit(Bs, As, w)[0].double() @ F.fedit(Bs, As, w)[1].double()), ideal)
    B, A = F.fedrot(Bs, As, w, B0, A0, side)
    assert fedit > 0.1  # frames Q_u destroy FedIT's average
    assert rel(B.double().numpy() @ A.double().numpy(), ideal) < tol  # aligned: exact
    # with noise the frames are no longer exact copies; the alignment still lowers the error a lot
    Bs, As, B0, A0 = rotated_copies(noise=0.05, dtype=dtype)
    B_it, A_it = F.fedit(Bs, As, w)
    B, A = F.fedrot(Bs, As, w, B0, A0, side)
    err_it, err_rot = F.relative_error(Bs, As, w, B_it, A_it), F.relative_error(Bs, As, w, B, A)
    assert err_rot < 0.2 * err_it
    B, A = F.fedrot(Bs, As, w, B0, A0, None)  # no side: FedIT's means
    assert torch.equal(B, B_it) and torch.equal(A, A_it)


def test_soft_alignment_turns_part_of_the_way() -> None:
    # 2×2 by hand: the best rotation is by θ; the polar factor of (I + R_θ)/2 is the rotation by θ/2
    theta = 0.8

    def rot(t: float) -> torch.Tensor:
        return torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=torch.float64)

    A_ref = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    A = rot(theta) @ A_ref  # RᵀA = A_ref for R = R_θ
    torch.testing.assert_close(F.procrustes_rotation(A, A_ref, "A"), rot(theta), rtol=0, atol=1e-12)
    torch.testing.assert_close(F.procrustes_rotation(A, A_ref, "A", lam=0.5), rot(theta / 2), rtol=0, atol=1e-12)
    # a zero reference (LoRA's B before any round) prefers no frame: the identity
    torch.testing.assert_close(F.procrustes_rotation(A, torch.zeros_like(A), "A"), torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("bad,message", [
    (dict(side="C"), "unknown side 'C'"), (dict(lam=0.0), r"lam must be a number in \(0, 1\]"),
    (dict(lam=1.5), r"lam must be a number in \(0, 1\]"), (dict(ref=torch.zeros(2, 4)), "must have the same shape")])
def test_procrustes_refuses_bad_input(bad: dict, message: str) -> None:
    args = {"X": torch.ones(2, 3), "ref": torch.ones(2, 3), "side": "A", "lam": 1.0, **bad}
    with pytest.raises(ValueError, match=message):
        F.procrustes_rotation(args["X"], args["ref"], args["side"], args["lam"])


# ---- Fed-SB -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", TOL)
def test_fed_sb_average_of_cores_is_exact(dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(3)
    d, k, r = 14, 10, 4
    B, A = torch.randn(d, r, generator=g).to(dtype), torch.randn(r, k, generator=g).to(dtype)
    Rs = [(torch.eye(r) + 0.3 * torch.randn(r, r, generator=g)).to(dtype) for _ in range(3)]
    w = [5.0, 1.0, 2.0]
    R_bar = F.fed_sb(Rs, w)
    assert R_bar.dtype == dtype
    p = np.asarray(w) / sum(w)
    Bn, An, eye = B.double().numpy(), A.double().numpy(), np.eye(r)
    ideal = sum(pu * Bn @ (R.double().numpy() - eye) @ An for pu, R in zip(p, Rs))
    assert rel(Bn @ (R_bar.double().numpy() - eye) @ An, ideal) < tol
    P, Q = F.core_factors(B, R_bar, A)  # the same update as plain LoRA factors
    assert rel(P.double().numpy() @ Q.double().numpy(), ideal) < tol
    with pytest.raises(ValueError, match="every core must be the same r×r matrix shape"):
        F.fed_sb([Rs[0], torch.ones(r, r + 1, dtype=dtype)], [1.0, 1.0])


def test_the_new_rules_never_form_a_dk_matrix() -> None:
    """d = k = 200,000 (a d×k float32 matrix would take 160 GB): FedRot's alignment keeps every client's update and
    lowers FedIT's error, and Fed-SB's mean core is exact, measured without ΔW̄."""
    d, r = 200_000, 2
    g = torch.Generator().manual_seed(0)
    B0, A0 = torch.randn(d, r, generator=g) * 1e-2, torch.randn(r, d, generator=g) / 400
    Qs = [torch.linalg.qr(torch.randn(r, r, generator=g)).Q for _ in range(3)]
    Bs = [B0 @ Q + 1e-3 * torch.randn(d, r, generator=g) for Q in Qs]
    As = [Q.T @ A0 for Q in Qs]
    w = [1.0, 2.0, 3.0]
    for side in ("A", "B"):
        new_B, new_A = F.fedrot_align(Bs, As, B0, A0, side)
        for B, A, B2, A2 in zip(Bs, As, new_B, new_A):
            assert F.relative_error([B], [A], [1.0], B2, A2) < 1e-5  # B_u A_u unchanged (float32)
        B, A = F.fedrot(Bs, As, w, B0, A0, side)
        assert F.relative_error(Bs, As, w, B, A) < 0.5 * F.relative_error(Bs, As, w, *F.fedit(Bs, As, w))
    Rs = [torch.eye(r) + 0.1 * torch.randn(r, r, generator=g) for _ in range(3)]
    cores = [F.core_factors(B0, R, A0) for R in Rs]
    B, A = F.core_factors(B0, F.fed_sb(Rs, w), A0)
    assert F.relative_error([c[0] for c in cores], [c[1] for c in cores], w, B, A) < 1e-5


# ---- HLoRA's mixed-rank reconstruction is FlexLoRA's (and FLoRA-NA's) product ------------------------------------

@pytest.mark.parametrize("dtype,tol", TOL)
def test_hlora_reconstruction_delivers_flexlora_and_flora_na_products(dtype: torch.dtype, tol: float) -> None:
    """NVFlare's HLoRA (PR #4424): reconstruct Σ p_u B_u A_u from clients of ranks 2, 3, 4, take its SVD, keep the
    global rank as B = U_r, A = Σ_r V_rᵀ, and give each client the leading r_u components. FlexLoRA (B = U_rΣ_r,
    A = V_rᵀ) and FLoRA-NA's "svd" (Σ^½ on each) split the same components differently: every truncation has the
    same product, so the three differ only in how the next round's local training starts."""
    Bs, As, w = layer(n=3, ranks=(2, 3, 4), dtype=dtype)
    U, S, Vt = np.linalg.svd(dense_ideal(Bs, As, w))  # HLoRA, dense, in numpy
    hl_B, hl_A = U[:, :4], S[:4, None] * Vt[:4]
    fx_B, fx_A = F.flexlora(Bs, As, w, rank=4)
    na_B, na_A = F.flora_na(Bs, As, w, rank=4)
    for q in (2, 3, 4):  # what a client of rank q receives
        want = hl_B[:, :q] @ hl_A[:q]
        assert rel(fx_B[:, :q].double().numpy() @ fx_A[:q].double().numpy(), want) < tol
        assert rel(na_B[:, :q].double().numpy() @ na_A[:q].double().numpy(), want) < tol


# ---- the methods in real rounds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("setting,round_,side", [
    ("alternate", 1, None), ("alternate", 2, "A"), ("alternate", 3, "B"), ("alternate", 4, "A"),
    ("A", 1, None), ("A", 3, "A"), ("B", 2, "B")])
def test_fedrot_side_schedule(setting: str, round_: int, side: str | None) -> None:
    from fedlora.experiment import build

    exp = build(tiny_config("method.name=fedrot", f"method.rot_side={setting}"))
    assert exp.method.side(round_) == side


def test_fedrot_broadcasts_the_aligned_means_of_the_uploads() -> None:
    from fedlora.experiment import build
    from fedlora.runtime.loop import run_round
    from fedlora.runtime.simulation import make_server
    from test_methods import Recorder

    exp = build(tiny_config("method.name=fedrot"))
    server, transport = make_server(exp), Recorder(exp)
    records = [run_round(server, transport, exp.config, 1, exp.split.global_test, evaluate=True)]
    start = {k: v.clone() for k, v in server.global_state.items()}  # the global adapter round 2 starts from
    records.append(run_round(server, transport, exp.config, 2, exp.split.global_test, evaluate=True))
    roles = {k: role(k) for k in exp.init_state}
    assert all({roles[k] for k in u.payload} == {"A", "B", "head"} for u in transport.uploads)
    ups = transport.uploads[3:]
    w = [float(u.num_examples) for u in ups]
    from fedlora.adapters import layer_pairs
    for a_key, b_key in layer_pairs(exp.info.with_role("A", "B")).values():
        Bs, As = [u.payload[b_key] for u in ups], [u.payload[a_key] for u in ups]
        B, A = F.fedrot(Bs, As, w, start[b_key], start[a_key], "A")  # round 2 aligns A
        torch.testing.assert_close(server.global_state[b_key], B, rtol=0, atol=0)
        torch.testing.assert_close(server.global_state[a_key], A, rtol=0, atol=0)
    for k in (k for k, r in roles.items() if r == "head"):
        torch.testing.assert_close(server.global_state[k].double(), expected_mean(ups, k), rtol=0, atol=1e-6)
    assert all(rec["bytes_up"] == records[0]["bytes_up"] for rec in records)  # FedIT's bytes every round


def test_fed_sb_uploads_only_the_cores_and_its_global_update_is_the_clients_mean() -> None:
    exp, server, transport, records = recorded_rounds("method.name=fed-sb", "adapter.kind=lora-sb", n=2)
    cores = [k for k in exp.init_state if k.endswith(".psoft_R.weight")]
    assert len(cores) == 4 and all(role(k) == "M" for k in cores)
    for u in transport.uploads:
        assert set(u.payload) == set(cores) | {k for k in exp.init_state if role(k) == "head"}
    # tiny-bert, rank 4 on query and value of 2 layers: 4 cores of 4×4 floats, head 2×32 + 2, float32
    assert records[-1]["bytes_up"] == 3 * (4 * 16 + 2 * 32 + 2) * 4
    ups = transport.uploads[-3:]
    for k in cores:  # the mean core, and every client received it
        torch.testing.assert_close(server.global_state[k].double(), expected_mean(ups, k), rtol=0, atol=1e-6)
        assert all(torch.equal(node.state[k], server.global_state[k]) for node in transport.nodes)
    # exact: the global ΔW equals the weighted mean of the clients' ΔW, on the model's own fixed B and A
    from peft.tuners.psoft.layer import PsoftLayer
    module = next(m for m in exp.model.modules() if isinstance(m, PsoftLayer))
    A, B = (t.double() for t in module._get_psoft_ab_cache_buffers("default"))
    key = next(k for k in cores if k.startswith(_saved_prefix(exp.model, module)))
    eye = torch.eye(4, dtype=torch.float64)
    ideal = sum(float(u.num_examples) * (B @ (u.payload[key].double() - eye) @ A) for u in ups) / \
        sum(u.num_examples for u in ups)
    torch.testing.assert_close(B @ (server.global_state[key].double() - eye) @ A, ideal, rtol=0, atol=1e-5)


def _saved_prefix(model: torch.nn.Module, module: torch.nn.Module) -> str:
    name = next(n for n, m in model.named_modules() if m is module)
    return name + ".psoft_R"


def test_fedsa_share_b_is_the_mirror_image() -> None:
    exp, server, transport, records = recorded_rounds("method.name=fedsa", "method.share=B", n=2)
    roles = {k: role(k) for k in exp.init_state}
    assert all({roles[k] for k in u.payload} == {"B"} for u in transport.uploads)
    ups = transport.uploads[-3:]
    for k, r in roles.items():
        for cid, node in enumerate(transport.nodes):
            if r == "B":  # shared: every client holds the weighted mean
                torch.testing.assert_close(node.state[k].double(), expected_mean(ups, k), rtol=0, atol=1e-6)
            else:  # A and the head: what the client trained, untouched by aggregation
                assert torch.equal(node.state[k], transport.trained[cid][k]), k
    a_key = next(k for k, r in roles.items() if r == "A")
    assert not torch.equal(transport.nodes[0].state[a_key], transport.nodes[1].state[a_key])
    assert records[-1]["acc_global"] is None and records[-1]["bytes_up"] == 3 * 4 * 128 * 4  # 4 B's of 32×4


@pytest.mark.parametrize("overrides,message", [
    (("method.name=fedrot", "method.rot_side=C"),
     r"method.rot_side = 'C' is not allowed; choose one of: alternate, A, B"),
    (("method.name=fedrot", "method.rot_lambda=0"), r"method.rot_lambda"),
    (("method.name=fedsa", "method.share=C"), r"method.share = 'C' is not allowed; choose one of: A, B"),
    (("method.name=fed-sb",), r"method.name = 'fed-sb' needs an r×r trainable core .* adapter.kind = 'lora-sb'"),
    (("method.name=fedit", "adapter.kind=lora-sb"),
     r"adapter.kind = 'lora-sb' needs a method that uploads and averages LoRA-SB's r×r core .* method.name = 'fed-sb'"),
    (("method.name=fedrot", "adapter.kind=vera"), r"method.name = 'fedrot' needs low-rank factors"),
])
def test_bad_configs_name_the_key_and_the_choices(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(*overrides)


def test_a_fed_sb_run_exports_a_plain_peft_adapter(tmp_path_factory: pytest.TempPathFactory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What `fedlora export` writes for LoRA-SB: PEFT's PSOFT adapter (one r×r core per layer), which plain PEFT
    loads on the exported base (rebuilding the fixed B and A from its weights), and a merged model."""
    import json

    from safetensors.torch import load_file

    from fedlora import export
    from test_export import assert_plain_loads_give_the_saved_logits, finished_run

    run = finished_run(tmp_path_factory, "method.name=fed-sb", "adapter.kind=lora-sb")
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    export.export(run, None, merged, merged=True)
    export.export(run, None, adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "PSOFT"
    assert {tuple(t.shape) for t in load_file(str(adapter / "adapter_model.safetensors")).values()
            if t.ndim == 2 and t.shape[0] == t.shape[1]} == {(4, 4)}
    assert_plain_loads_give_the_saved_logits(run, merged, adapter)
