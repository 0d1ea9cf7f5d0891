"""model.Transformer's explicit attention mask (what tree-shaped attention, e.g. lookahead decoding, needs):
the default mask is what positions imply, and a mask that hides earlier new tokens from later ones gives the
logits transformers computes with the same custom 4-D mask."""
import torch

LOGITS_ATOL = 1e-4  # float32, ours against transformers (as tests/test_model.py)


def test_explicit_causal_mask_equals_default(hf_checkpoint, load_ours, prompt_ids):
    _, d = hf_checkpoint("gqa")
    ours = load_ours(d)
    idx = torch.tensor([prompt_ids(24, seed=11)], device=ours.output.weight.device)
    ours.setup_caches(1, 32)
    pos = torch.arange(24, device=idx.device)
    default = ours(idx, pos)
    causal = torch.arange(32, device=idx.device) <= pos[:, None]  # (T, cache_len)
    assert torch.equal(ours(idx, pos, mask=causal[None]), default)


def test_branches_that_do_not_see_each_other_match_hf(hf_checkpoint, load_ours, prompt_ids):
    """A prefix of P tokens in the cache, then 4 new tokens at slots P..P+3 in two branches: tokens 0 and 2 form one
    branch, 1 and 3 the other; each sees the prefix, its own branch up to itself, and never the other branch."""
    hf, d = hf_checkpoint("gqa")
    ours = load_ours(d)
    device = ours.output.weight.device
    seq = prompt_ids(20, seed=12)
    P, T, S = 16, 4, 24
    sees = torch.ones(T, P + T, dtype=torch.bool)
    sees[:, P:] = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)

    hf_mask = torch.ones(P + T, P + T, dtype=torch.bool).tril()
    hf_mask[P:] = sees
    additive = torch.zeros(P + T, P + T).masked_fill(~hf_mask, float("-inf"))  # transformers' custom 4-D mask
    with torch.no_grad():
        ref = hf(torch.tensor([seq]), attention_mask=additive[None, None],
                 position_ids=torch.arange(P + T)[None]).logits[0, P:]

    ours.setup_caches(1, S)
    ours(torch.tensor([seq[:P]], device=device), torch.arange(P, device=device))
    mask = torch.zeros(T, S, dtype=torch.bool)
    mask[:, :P + T] = sees
    got = ours(torch.tensor([seq[P:]], device=device), torch.arange(P, P + T, device=device),
               mask=mask[None].to(device))[0].cpu()
    assert (got - ref).abs().max().item() <= LOGITS_ATOL
    # the mask matters: plain causal attention over the same tokens gives other logits for the later tokens
    causal = ours(torch.tensor([seq[P:]], device=device), torch.arange(P, P + T, device=device))[0].cpu()
    assert (causal[2:] - ref[2:]).abs().max().item() > 100 * LOGITS_ATOL
