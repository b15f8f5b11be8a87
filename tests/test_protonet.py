import pytest
import torch
import torch.nn.functional as F

from amt.protonet import ProtoHead, prototypes


def test_prototypes_are_class_means():
    emb = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0], [10.0, 1.0]])
    labels = torch.tensor([1, 1, 0, 2])
    protos = prototypes(emb, labels, 3)
    assert torch.equal(protos, torch.tensor([[0.0, 5.0], [2.0, 1.0], [10.0, 1.0]]))


def test_batched_episodes_equal_one_at_a_time():
    torch.manual_seed(0)
    emb, queries = torch.randn(3, 6, 8), torch.randn(3, 4, 8)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2], [2, 1, 0, 0, 1, 2], [1, 2, 0, 1, 2, 0]])
    protos, head = prototypes(emb, labels, 3), ProtoHead()
    for e in range(3):
        torch.testing.assert_close(protos[e], prototypes(emb[e], labels[e], 3))
        torch.testing.assert_close(head(queries, protos)[e], head(queries[e], protos[e]))
    labels[1] = torch.tensor([0, 1, 0, 0, 1, 1])  # episode 1 lacks class 2
    with pytest.raises(ValueError, match=r"classes \[\[1, 2\]\] have no support"):
        prototypes(emb, labels, 3)


@pytest.mark.parametrize(("labels", "message"), [
    (torch.tensor([0, 0, 2, 2]), "classes \\[1\\] have no support"),
    (torch.tensor([0, 1, 2, 3]), "expected 0..2"),
    (torch.tensor([0, 1, 2]), "one label per embedding"),
])
def test_prototypes_reject_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        prototypes(torch.randn(4, 8), labels, 3)


def test_head_is_scaled_cosine_with_bias():
    torch.manual_seed(0)
    head = ProtoHead()
    assert head.scale.item() == 10.0 and head.bias.item() == 0.0
    with torch.no_grad():
        head.bias.fill_(0.25)
    query, protos = torch.randn(5, 16), torch.randn(3, 16)
    expected = 10.0 * (F.cosine_similarity(query[:, None], protos[None], dim=-1) + 0.25)
    torch.testing.assert_close(head(query, protos), expected)
    # invariant to the embeddings' norms
    torch.testing.assert_close(head(3 * query, 0.5 * protos), expected)


def test_scale_learns_and_bias_gets_no_gradient():
    torch.manual_seed(0)
    head = ProtoHead()
    logits = head(torch.randn(6, 8), torch.randn(3, 8))
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert head.scale.grad.abs() > 0
    assert head.bias.grad.abs() < 1e-6  # a shift of every logit leaves softmax unchanged
