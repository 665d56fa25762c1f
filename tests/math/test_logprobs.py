"""Token log-probs and per-segment sums against float64 torch references computed in the test."""

import torch

from tests.dist_utils import run_distributed
from wrpo_nemo.logprobs import IGNORE_INDEX, per_prompt_by_role, segment_sums, token_logprobs


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits.double(), dim=-1)
    out = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(out), out)


def test_token_logprobs_and_grads_match_float64_log_softmax_across_chunks():
    torch.manual_seed(0)
    logits = (torch.randn(3, 11, 37) * 4).requires_grad_()
    labels = torch.randint(0, 37, (3, 11))
    labels[0, :2] = IGNORE_INDEX
    weights = torch.randn(3, 11)
    before = logits.detach().clone()
    out = token_logprobs(logits, labels, chunk_tokens=5)  # 33 tokens -> 7 chunks, the last partial
    (out * weights).sum().backward()
    assert torch.equal(logits.detach(), before), "the caller's logits must not be modified"
    ref_logits = before.double().requires_grad_()
    ref = _reference(ref_logits, labels)
    (ref * weights.double()).sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)
    assert torch.all(out[0, :2] == 0) and torch.all(logits.grad[0, :2] == 0)


def test_bf16_logits_give_fp32_logprobs_close_to_float64():
    torch.manual_seed(1)
    logits = (torch.randn(64, 1000) * 3).bfloat16()
    labels = torch.randint(0, 1000, (64,))
    out = token_logprobs(logits, labels, chunk_tokens=16)
    torch.testing.assert_close(out.double(), _reference(logits.float(), labels), rtol=0, atol=1e-4)


def _tp2_worker(rank, world_size):
    import torch.distributed as dist

    torch.manual_seed(0)
    real_vocab, padded_vocab = 13, 14  # vocab padded to a multiple of TP = 2
    full = (torch.randn(2, 9, padded_vocab, dtype=torch.float64) * 3).float()
    labels = torch.randint(0, real_vocab, (2, 9))
    labels[0, 0], labels[0, 1], labels[1, 2] = 0, 12, 7  # both shards, both shard edges
    labels[1, -1] = IGNORE_INDEX
    weights = torch.randn(2, 9)
    local = padded_vocab // world_size
    shard = full[..., rank * local : (rank + 1) * local].clone().requires_grad_()
    out = token_logprobs(shard, labels, group=dist.group.WORLD, chunk_tokens=4)
    (out * weights).sum().backward()

    ref_full = full.double().requires_grad_()
    ref = _reference(ref_full, labels)
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)
    ref_grad_shard = ref_full.grad[..., rank * local : (rank + 1) * local]
    torch.testing.assert_close(shard.grad.double(), ref_grad_shard, rtol=1e-5, atol=1e-6)


def test_vocab_parallel_logprobs_and_grads_with_tp2_equal_unsharded():
    run_distributed(_tp2_worker, 2)


def test_segment_sums_on_a_packed_row_equal_sums_of_separate_sequences():
    torch.manual_seed(2)
    vocab = 23
    lengths = [5, 8, 3, 6]
    seqs = [torch.randint(0, vocab, (n,)) for n in lengths]
    seq_logits = [torch.randn(n, vocab) for n in lengths]
    prompt_len = [2, 3, 1, 2]  # the first tokens of each sequence are prompt: no loss there
    # Separate sequences: sum of log p(next token) over response positions.
    expected = []
    for s, lg, p in zip(seqs, seq_logits, prompt_len, strict=True):
        lp = torch.log_softmax(lg.double(), -1)
        expected.append(sum(lp[t, s[t + 1]] for t in range(p - 1, len(s) - 1)))
    # The same sequences packed into two rows of 14 tokens, padding at the ends.
    rows, seq_len = 2, 14
    logits = torch.zeros(rows, seq_len, vocab)
    labels = torch.full((rows, seq_len), IGNORE_INDEX)
    seg = torch.full((rows, seq_len), -1)
    mask = torch.zeros(rows, seq_len, dtype=torch.bool)
    placement = [(0, 0), (0, 5), (1, 0), (1, 3)]
    for i, ((row, off), s, lg, p) in enumerate(zip(placement, seqs, seq_logits, prompt_len, strict=True)):
        n = len(s)
        logits[row, off : off + n] = lg
        labels[row, off : off + n - 1] = s[1:]
        seg[row, off : off + n] = i
        mask[row, off + p - 1 : off + n - 1] = True
    tok = token_logprobs(logits, labels, chunk_tokens=7)
    sums = segment_sums(tok, seg, num_segments=4, mask=mask)
    torch.testing.assert_close(sums.double(), torch.stack(expected), rtol=1e-6, atol=1e-5)


def test_segment_sums_pass_gradient_only_to_masked_positions():
    values = torch.randn(2, 5, requires_grad=True)
    seg = torch.tensor([[0, 0, 1, 1, -1], [2, 2, 2, -1, -1]])
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    sums = segment_sums(values, seg, 3, mask)
    sums.sum().backward()
    expected_grad = (mask & (seg >= 0)).float()
    assert torch.equal(values.grad, expected_grad)


def test_per_prompt_by_role_places_segments_and_rejects_missing_roles():
    vals = torch.tensor([10.0, 11.0, 12.0, 20.0, 21.0, 22.0])
    prompt = torch.tensor([1, 0, 0, 1, 0, 1])
    role = torch.tensor([2, 0, 1, 0, 2, 1])
    out = per_prompt_by_role(vals, prompt, role, num_prompts=2)
    assert out.tolist() == [[11.0, 12.0, 21.0], [20.0, 22.0, 10.0]]
    try:
        per_prompt_by_role(vals[:5], prompt[:5], role[:5], num_prompts=2)
    except ValueError as e:
        assert "exactly one segment" in str(e)
    else:
        raise AssertionError("a missing (prompt, role) must raise")


def test_inplace_backward_gives_the_same_gradient_written_into_the_logits_storage():
    torch.manual_seed(3)
    base = torch.randn(40, 29) * 3
    labels = torch.randint(0, 29, (40,))
    a = base.clone().requires_grad_()
    token_logprobs(a, labels, chunk_tokens=6).sum().backward()
    leaf = base.clone().requires_grad_()
    inner = leaf * 1.0  # a non-leaf temporary, like the output layer's logits in training
    token_logprobs(inner, labels, chunk_tokens=6, inplace_backward=True).sum().backward()
    torch.testing.assert_close(leaf.grad, a.grad, rtol=0, atol=0)
    assert inner.data_ptr() == leaf.grad.data_ptr() or torch.equal(inner.detach(), a.grad)


def _tp2_padded_worker(rank, world_size):
    import torch.distributed as dist

    torch.manual_seed(5)
    real_vocab, padded_vocab = 11, 16  # rank 1's slice [8, 16) holds 3 real and 5 padding columns
    full = torch.randn(20, padded_vocab) * 3
    labels = torch.randint(0, real_vocab, (20,))
    labels[:2] = torch.tensor([10, 0])
    local = padded_vocab // world_size
    shard = full[:, rank * local : (rank + 1) * local].clone().requires_grad_()
    out = token_logprobs(shard, labels, group=dist.group.WORLD, chunk_tokens=6, vocab_size=real_vocab)
    out.sum().backward()
    ref_logits = full[:, :real_vocab].double().requires_grad_()
    ref = _reference(ref_logits, labels)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-5)
    ref_grad = torch.zeros(20, padded_vocab, dtype=torch.float64)
    ref_grad[:, :real_vocab] = ref_logits.grad
    torch.testing.assert_close(
        shard.grad.double(), ref_grad[:, rank * local : (rank + 1) * local], rtol=1e-5, atol=1e-6
    )


def test_padded_vocabulary_columns_are_left_out_like_an_unpadded_model_tp2():
    run_distributed(_tp2_padded_worker, 2)


def test_padded_vocabulary_columns_are_left_out_in_one_process():
    torch.manual_seed(6)
    logits = torch.randn(7, 12).requires_grad_()
    labels = torch.randint(0, 9, (7,))
    out = token_logprobs(logits, labels, vocab_size=9)
    out.sum().backward()
    ref_logits = logits.detach()[:, :9].double().requires_grad_()
    ref = _reference(ref_logits, labels)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.all(logits.grad[:, 9:] == 0)
