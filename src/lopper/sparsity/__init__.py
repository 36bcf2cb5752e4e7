"""Unstructured and N:M sparsity on what remains after structured pruning (or on an unpruned model).

Zeroes a fraction of the weights of the Linear (and GPT-2 Conv1D) modules inside the decoder/encoder layers; the
embeddings, the lm_head and anything outside the layers are never candidates. Zeros are stored in the ordinary
dense tensors, so the output stays a standard checkpoint; which weights were zeroed is recorded twice: the achieved
fraction per module in the plan (`"sparsity"` key of lopper_plan.json) and the masks themselves, bit-packed, in
`lopper_masks.npz` beside the weights, so that `lopper prune --plan DIR/lopper_plan.json` re-applies exactly the
same masks. (Not a `.safetensors` file on purpose: loaders such as vLLM read every `*.safetensors` of a folder
without an index as weights.)

Criteria, each scoring weight W_ij (output i, input j) of one module:
- magnitude: |W_ij|; no calibration.
- wanda: |W_ij| * ||X_j||_2, X_j the j-th input channel over all calibration tokens (Sun et al. 2023).
- sparsegpt: OBS-style pruning (Frantar & Alistarh 2023). With H = 2 X^T X / N + damp * mean(diag) * I (damp 0.01)
  and the upper Cholesky factor U of H^-1, columns are visited left to right in blocks of 128; in each block the
  mask is chosen by w^2 / U_cc^2 (adaptive mask selection), each pruned weight's error is spread over the
  remaining columns of its row (W_:,c+1: -= err_c U_c,c+1:), and the block's error is applied to the later
  columns at once (lazy batch update).
Wanda and SparseGPT are sequential: layer l is scored on the activations of layers 0..l-1 as already sparsified
(both papers' reference code); every module of one layer sees that layer's dense input.

Patterns and scopes:
- unstructured, scope `row`: every output row of a module loses round(s * in) weights (Wanda's default);
  `layer`: each module loses round(s * numel), anywhere; `global`: one threshold over all candidate weights
  (magnitude and wanda only; wanda then uses one pass of dense activations). For SparseGPT the row / layer counts
  are met per block of columns, cumulatively rounded, so the module totals are the same.
- N:M (2:4, 4:8, ...): at most N nonzeros in every group of M consecutive inputs of a row; a final partial group
  of r < M inputs keeps at most N. The fraction is then fixed at 1 - N/M: `--sparsity` may be left at 0 (the
  pattern alone turns sparsity on) or given as exactly 1 - N/M; anything else is refused. The scope does not apply.

Allocation: `uniform` gives every layer the target; `owl` (Yin et al. 2024) measures each layer's outlier ratio D_l,
the share of Wanda scores above M = 5 times the layer's mean score (dense activations), maps D_l linearly onto
[0, 2 * lambda] (lambda = 0.08) and gives layer l the sparsity s + mean - that value, so layers with more outliers
are pruned less. The mean is weighted by each layer's number of candidate weights (the plain mean of the paper when
the layers are equally wide), so the overall fraction is the target; ratios are clipped to [0, 0.99].

Module names (for `--sparsity-ignore`, a regex searched in them, and in the plan) are those of the model as
saved, i.e. after structured surgery: layers renumbered 0..n-1.

Modules: settings.py (the options), criteria.py (which weights: lowest scores, N:M, SparseGPT), apply.py (the pass
over a model, OWL, the prune step), masks.py (the mask file, 2:4 kernels).
"""
from .apply import LINEAR, OWL_LAMBDA, OWL_M, Result, Target, for_prune, input_sq, nonzero_non_embedding, owl_targets, \
    sparsify, targets
from .criteria import lowest, lowest_nm, lowest_per_row, prune_mask, score, sparsegpt
from .masks import MASKS_FILE, MASKS_FORMAT, is_2_4, load_masks, pack_masks, to_semi_structured
from .settings import ALLOCATIONS, CRITERIA, SCOPES, Spec, check_args, needs_calibration, plan_settings

__all__ = ["ALLOCATIONS", "CRITERIA", "LINEAR", "MASKS_FILE", "MASKS_FORMAT", "OWL_LAMBDA", "OWL_M", "SCOPES", "Result",
           "Spec", "Target", "check_args", "for_prune", "input_sq", "is_2_4", "load_masks", "lowest", "lowest_nm",
           "lowest_per_row", "needs_calibration", "nonzero_non_embedding", "owl_targets", "pack_masks",
           "plan_settings", "prune_mask", "score", "sparsegpt", "sparsify", "targets", "to_semi_structured"]
