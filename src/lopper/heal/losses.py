"""The healing losses: logit distillation plus language-model cross-entropy for decoders, and a cosine or MSE loss
between mean-pooled sentence embeddings for encoders. Computed in float32 whatever the autocast dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over the vocabulary, averaged over positions."""
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, averaged over the predicted positions."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def decoder_loss(student_logits, teacher_logits, ids, kd_weight: float, temperature: float) -> torch.Tensor:
    """A * T^2 * KL + (1 - A) * CE; a term with weight 0 is not computed (and teacher_logits may then be None)."""
    loss = 0.0
    if kd_weight > 0:
        loss = kd_weight * kd_loss(student_logits, teacher_logits, temperature)
    if kd_weight < 1:
        loss = loss + (1 - kd_weight) * lm_loss(student_logits, ids)
    return loss


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Per-batch mean of 1 - cos(student, teacher) per sentence, or the mean squared error."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return F.mse_loss(s, t)


def encoder_embeddings(model, batch: dict) -> torch.Tensor:
    """Mean-pooled last hidden states (the sentence-transformers pooling), for a bare encoder or one with a head."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return mean_pool(out.hidden_states[-1], batch["attention_mask"])
