"""`moekit doctor`: catch the silent failures of Mixture-of-Experts models.

The failures MoE users meet most often raise no error: experts die, one expert takes most of
the load, the router collapses, the aux-loss-free bias never moves, nothing balances the load,
LoRA adapters never train, a conversion duplicates or drops experts, routers are stored in low
precision. `diagnose` checks a model directory (and a training run's metrics and checkpoints)
for each of them and returns a `Diagnosis`: one `Check` per failure mode, `ok`, `warning` or
`problem`, with the evidence (the numbers) and what to do.

The checks, in the order they are reported (docs/doctor.md explains each), by module:

  routing_checks  dead_experts          experts that get no (or almost no) tokens on a sample
                  load_imbalance        max over mean routed copies per expert on the sample
                  router_collapse       mean routing entropy, as a fraction of log(E)
  training        training_dead_experts experts the run's metrics.jsonl reports dead lately
  balancing       selection_bias        aux-loss-free balancing: a bias all zeros or unmoved
                  load_balancing        an aux-loss weight of zero with nothing else balancing
  adapters        adapters              fine-tuned weights (LoRA B, ESFT/full experts) unchanged
  weights         expert_copies         experts that are exact copies of each other, or zeros
                  router_precision      router weights or selection biases in bf16/fp16
  groups          dead_groups           hierarchical routing: expert groups no token chooses

The other modules: `check` (Check, statuses, shared helpers), `sample` (the routing sample,
measured with `moekit.analysis.routing`), `weight_files` (stored tensors read on demand) and
`diagnosis` (`diagnose`, `Diagnosis`, the thresholds). To add a check, write a function that
returns a `Check` in the module of its group (or a new one), call it in `diagnose`'s list, and
plant the fault in a test (docs/doctor.md, "Adding a check").

A check that does not apply to the model (a LoRA check on a model without adapters) is `ok`,
says why it did not apply, and has `data["applicable"] = False`.

Heavy imports (torch, safetensors, rich) happen inside functions: importing this package to
build the command line costs nothing.
"""

from moekit.analysis.doctor.check import STATUSES, Check, Status, exit_code, worst_status
from moekit.analysis.doctor.diagnosis import (
    COLLAPSE_ENTROPY,
    DEAD_SHARE,
    DEAD_WINDOW,
    IMBALANCE_PROBLEM,
    IMBALANCE_WARNING,
    SAMPLE_SEQ_LEN,
    SAMPLE_TOKENS,
    Diagnosis,
    Thresholds,
    diagnose,
    resolve_run_dir,
)

__all__ = [
    "COLLAPSE_ENTROPY",
    "DEAD_SHARE",
    "DEAD_WINDOW",
    "IMBALANCE_PROBLEM",
    "IMBALANCE_WARNING",
    "SAMPLE_SEQ_LEN",
    "SAMPLE_TOKENS",
    "STATUSES",
    "Check",
    "Diagnosis",
    "Status",
    "Thresholds",
    "diagnose",
    "exit_code",
    "resolve_run_dir",
    "worst_status",
]
