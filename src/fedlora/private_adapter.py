"""A client's private second adapter (``Method.private_adapter``: FedDPA's local adapter) in a run directory: saved
beside the client's shared adapter as a PEFT adapter folder of its own, ``clients/<k>/private/`` (LoRA tensors only;
the head is the shared adapter's), with ``fedlora_mix.json``, the weights that combine the two; and combined, for
serving, into the one plain PEFT adapter they sum to (``fedlora export``, :func:`fedlora.export.load_saved`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from fedlora.errors import FedloraError

if TYPE_CHECKING:
    import torch

    from fedlora.experiment import Experiment

PRIVATE_DIR = "private"
MIX_FILE = "fedlora_mix.json"


def write_private_adapter(exp: Experiment, state: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Where ``state`` holds a private adapter: ``folder/private/`` (adapter_config.json, adapter_model.safetensors,
    saved names without the private prefix) and ``folder/private/fedlora_mix.json`` (the weights of the client's
    model W0 + w_s·ΔW_shared + w_p·ΔW_private, or how they are computed per example). Else nothing."""
    import copy

    from safetensors.torch import save_file

    from fedlora.adapters import PRIVATE, PRIVATE_ADAPTER, private_part

    private = private_part(state)
    if not private or exp.private is None:
        return
    out = folder / PRIVATE_DIR
    out.mkdir()
    save_file({k[len(PRIVATE):]: v.detach().cpu().contiguous() for k, v in private.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg: Any = copy.copy(exp.model.peft_config[PRIVATE_ADAPTER])
    cfg.modules_to_save = None  # the head is the shared adapter's (PEFT's copy of it is never trained)
    cfg.save_pretrained(str(out))
    k = exp.private.reference_examples
    mix: dict[str, Any] = {"model": "W0 + w_shared * dW_shared + w_private * dW_private", "method": exp.config.method.name}
    if k:
        mix.update(weights="per example", reference_examples=k)
    else:
        mix["weights"] = [float(w) for w in exp.private.weights(None, None)]
    (out / MIX_FILE).write_text(json.dumps(mix, indent=2) + "\n", encoding="utf-8")


def combine_private(folder: Path, dest: Path) -> None:
    """Write into ``dest`` the one PEFT LoRA adapter that equals a client's shared adapter (``folder``) and private
    adapter (``folder/private``) combined with fixed weights: W0 + w_s·s·B_s·A_s + w_p·s·B_p·A_p is the rank-2r
    adapter B = [w_s·B_s, w_p·B_p], A = [A_s; A_p] at the same scaling s (lora_alpha = s·2r, no rsLoRA); the head,
    if any, is the shared adapter's. Per-example weights (FedDPA's dynamic weighting) have no such form: refused."""
    import math

    import torch
    from safetensors.torch import load_file, save_file

    mix = json.loads((folder / PRIVATE_DIR / MIX_FILE).read_text(encoding="utf-8"))
    if not isinstance(mix.get("weights"), list):
        raise FedloraError(f"{str(folder)!r}: this client's model weighs its two adapters per example (dynamic "
                           "weighting), which one PEFT adapter cannot express; fedlora evaluate serves it, or run with "
                           "fixed weights to export")
    w_s, w_p = (float(w) for w in mix["weights"])
    shared = load_file(str(folder / "adapter_model.safetensors"))
    private = load_file(str(folder / PRIVATE_DIR / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_dora"):
        raise FedloraError(f"{str(folder)!r}: only a plain LoRA / rsLoRA adapter of one rank can be combined")
    r = int(config["r"])
    s = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    combined = dict(shared)
    for key, t in private.items():
        if key.endswith(".lora_A.weight"):
            combined[key] = torch.cat([shared[key], t], dim=0)
        elif key.endswith(".lora_B.weight"):
            combined[key] = torch.cat([w_s * shared[key], w_p * t], dim=1)
        else:
            raise FedloraError(f"{str(folder / PRIVATE_DIR)!r} holds {key!r}, which is not a LoRA factor")
    config.update(r=2 * r, lora_alpha=s * 2 * r, use_rslora=False)
    dest.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in combined.items()}, str(dest / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
