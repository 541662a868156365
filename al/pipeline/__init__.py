"""Pipelined AL training: stages of consecutive components that train at the same time.

The schedule (spec section 4): at tick tau, stage i trains on mini-batch tau - i.
Messages go forward only - (sg(s), sg(t), labels) of one mini-batch - and no
gradient, weight or flush ever goes back, so every component trains on the same
batches, in the same order, with the same weights as in the sequential loop, and
ends bit-identical to it when its kernels are (one intra-op thread per stage).

Where things are:
- plan.py: which components each stage trains, on which device (given, or balanced by time);
- stage.py: one stage and its loop, which trains each mini-batch that reaches it;
- transport.py: queues between threads, torch.distributed between processes, the failures of a run;
- launch.py: stage processes, spawned on one host or started by torchrun across hosts;
- runners.py: the runners the trainer drives (`ThreadsRunner`, `ProcessesRunner`).

The last stage reports each finished mini-batch with its losses to the trainer,
which records it as the sequential loop does (loss sums, on_step callbacks,
request_stop). The end of a run of batches (epoch end or stop) is a sync point.
"""

from al.pipeline.plan import balance_by_time, parse_stages
from al.pipeline.runners import ProcessesRunner, ThreadsRunner, pipeline_runner
from al.pipeline.transport import PipelineError, StagesMissing

__all__ = ["PipelineError", "ProcessesRunner", "StagesMissing", "ThreadsRunner", "balance_by_time", "parse_stages",
           "pipeline_runner"]
