import torch


def naive_mix(x, lora_a, lora_b, index, weights, mix_parameters):
    """What a routed layer adds, token by token; ``lora_a [E, r, in]``, ``lora_b [E, out, r]``."""
    out = torch.zeros(x.shape[0], lora_b.shape[1])
    for t in range(x.shape[0]):
        w, chosen = weights[t], index[t]
        if mix_parameters:
            mixed_a = sum(wj * lora_a[e] for wj, e in zip(w, chosen, strict=True))
            mixed_b = sum(wj * lora_b[e] for wj, e in zip(w, chosen, strict=True))
            out[t] = mixed_b @ mixed_a @ x[t]
        else:
            out[t] = sum(wj * lora_b[e] @ lora_a[e] @ x[t] for wj, e in zip(w, chosen, strict=True))
    return out
