"""Typed run configuration: frozen dataclasses, one per concern, loaded from YAML (see load.py)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    name: str = "lbr_ray/assets/tiny-llama"  # HF hub name or local path (config.json + tokenizer, weights optional)
    from_scratch: bool = False  # build random weights from the config (tiny test/demo models)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_backend: str = "dense"  # dense | flex | kv_split: how the IB mask is applied
    attn_implementation: str = ""  # HF attention kernel for dense / kv_split: sdpa | eager ("" = sdpa; in bf16 on
    #                                 CPU eager is faster: benchmarks/results/cpu_speed.json)
    lora: bool = True  # LoRA via peft (plus trainable bottleneck rows); False = full fine-tuning
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class BottleneckConfig:
    ratio: float | None = 500.0  # R: k = clamp(ceil(n_input_tokens / R), k_min, k_max)
    k: int | None = None  # fixed k (overrides ratio)
    k_min: int = 1
    k_max: int = 16
    sink: bool = True  # target tokens may see the sink token at position 0
    pooling: str = "last"  # last | mean over the bottleneck states


@dataclass(frozen=True)
class SplitConfig:
    key: str = "normalized"  # normalized: case-folded, whitespace-collapsed query (twins share a split) | exact
    modulus: int = 10  # bucket = int(sha1(utf-8 key of the query)[:8], 16) % modulus
    test_buckets: tuple[int, ...] = (0,)
    dev_buckets: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class DataConfig:
    pairs: tuple[str, ...] = ("data/demo/medical/pairs.jsonl.gz",)  # files, directories or globs
    corpus: tuple[str, ...] = ("data/demo/medical/corpus.jsonl.gz",)
    max_input_tokens: int = 128
    max_target_tokens: int = 128
    on_bad_record: str = "error"  # error | skip (skipped records are counted in the run summary)
    types: tuple[str, ...] = ()  # keep only these pair types (empty = all)
    split: SplitConfig = field(default_factory=SplitConfig)
    max_record_bytes: int = 8 << 20  # a longer line is a bad record (a file that is not JSON lines, a runaway field)


@dataclass(frozen=True)
class StageConfig:
    lr: float = 1e-4
    warmup_steps: int = 10
    max_steps: int = 100
    batch_size: int = 8  # per worker micro-batch
    grad_accum: int = 1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 5
    checkpoint_every: int = 50
    epochs: int = 1000  # upper bound; max_steps normally ends the stage


@dataclass(frozen=True)
class IBGLConfig(StageConfig):
    target: str = "self"  # self | continuation | pair
    alpha: float = 0.0  # weight of the plain LM loss on the input tokens
    mask: bool = True  # False = plain causal LM on the text (the gl-cl ablation)
    use_corpus: bool = True  # train on corpus passages as well as on the training pairs' texts
    pack: bool = False  # pack several units into each fixed-length row (no attention across units)
    pack_length: int = 0  # tokens per packed row (0 = the longest possible unit: 1 + max_input + k_max + max_target)


@dataclass(frozen=True)
class LMConfig(StageConfig):
    """`lbr train --stage lm`: causal-LM (continued) pre-training on a weighted mixture of domain folders."""
    sources: tuple[str, ...] = ()  # domain folders (pairs* and corpus* files), files or globs
    weights: tuple[float, ...] = ()  # share of each source's documents per epoch (empty = as the data comes)
    seq_len: int = 256  # tokens per packed row (documents longer than that are cut into consecutive chunks)
    tokenizer_vocab: int = 0  # > 0: train a byte-level BPE tokenizer of this size on the mixture first
    lr: float = 1e-3
    log_every: int = 20
    checkpoint_every: int = 500


@dataclass(frozen=True)
class GRCLConfig(StageConfig):
    lr: float = 5e-5
    temperature: float = 0.02
    symmetric: bool = False
    hard_negatives: int = 0  # negatives per query taken from the pairs' `negatives` field
    gather: bool = True  # gather positives across workers (negatives grow with workers)
    length_groups: int = 0  # > 1: sort each run of this many batches by length before batching (less padding,
    #                         HF Trainer's group_by_length uses 50); 0 = batches as the shuffled stream comes
    gen_weight: float = 0.0  # lambda for the IB loss on query -> positive
    cache_chunk: int = 0  # > 0: GradCache, rows encoded this many at a time (activations of a chunk, not of the
    #                       batch; the same loss and gradients, ~1 more forward per step; docs/gradcache.md); 0 = off
    eval_every: int = 50  # dev R@10 every N steps (0 = only at the end)
    eval_at_start: bool = True  # dev R@10 before the first step too (the reference point; one more evaluation)
    eval_queries: int = 200  # dev queries for the in-training R@10
    eval_corpus: int = 2000  # distractor passages added to the dev positives
    collapse_std: float = 1e-3  # warn when the embedding std falls below this
    collapse_cos: float = 0.95  # ... or the mean pairwise cosine rises above this


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: int = 2  # 0 | 1 | 2 | 3
    bf16: bool = False
    offload_optimizer: bool = False


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 0  # torch intra-op threads per Train worker; 0 = auto: on the Ray that `lbr train`
    #                              starts itself, the machine's cores split among the workers; on a cluster,
    #                              Ray's default (OMP_NUM_THREADS = floor(cpus_per_worker))
    peak_tflops: float | None = None  # one device's peak TFLOP/s for MFU (default: GPU table / CPU estimate)
    gpu_memory: str = ""  # memory of one GPU, e.g. "80GiB", for the fit check at start (default: the local GPU's)
    worker_resource: str = ""  # custom resource each Train worker takes 1 of (e.g. one per node: `ray start
    #                            --resources '{"lbr_worker": 1}'`); empty = CPUs only


@dataclass(frozen=True)
class RunConfig:
    output: str = "runs/demo"
    seed: int = 0
    variant: str = "lbr"  # lbr | gl-cl | cl
    self_check: bool = True  # compare the mask backend with the dense reference before training
    resume: bool = False
    tensorboard: bool = True
    max_failures: int | None = None  # worker-group restarts from the latest checkpoint (None: 3 on a multi-node
    #                                  cluster, 0 on one machine; -1 = unlimited)
    storage_endpoint: str = ""  # S3-compatible endpoint for s3:// paths (else AWS_ENDPOINT_URL / AWS's default)


@dataclass(frozen=True)
class TuneConfig:
    """`lbr tune`: the search space (an empty tuple = that key is not searched) and how trials run."""
    search: str = "grid"  # grid | random | optuna
    ratio: tuple[float, ...] = ()  # R values (bottleneck.ratio)
    k: tuple[int, ...] = ()  # fixed k values (bottleneck.k), instead of ratio
    temperature: tuple[float, ...] = ()  # gr_cl.temperature
    lora_r: tuple[int, ...] = ()  # model.lora_r (needs model.lora: true)
    lr: tuple[float, ...] = ()  # gr_cl.lr (stage 2; trials keep sharing stage 1)
    log_uniform: bool = False  # random/optuna: ratio, temperature, lr log-uniform between the two values given
    num_samples: int = 1  # grid: repeats of the whole grid; random/optuna: number of trials
    metric: str = "dev_recall@10"  # dev_recall@10 | dev_ndcg@10, maximised (GR-CL's in-training dev metric)
    asha: bool = True  # ASHA early stopping on `metric`, time = GR-CL step
    grace_period: int = 20  # GR-CL steps before ASHA may stop a trial
    reduction_factor: float = 3.0
    max_concurrent_trials: int = 1  # 0 = as many as the cluster's CPUs (GPUs) allow
    workers_per_trial: int | None = None  # Ray Train workers per trial (default scaling.num_workers)
    ib_gl_steps: int | None = None  # stage-1 steps in every trial (default ib_gl.max_steps)
    gr_cl_steps: int | None = None  # stage-2 steps in every trial (default gr_cl.max_steps)
    eval_every: int | None = None  # dev metric every N stage-2 steps, ASHA's decision points (default gr_cl's)
    max_failures: int | None = None  # Tune retries of a failed trial (None: as run.max_failures)
    test_eval: bool = True  # evaluate the best trial's model on the test split (the `lbr eval` machinery)
    test_max_queries: int | None = None  # caps for that evaluation (deterministic samples)
    test_max_corpus: int | None = None
    eval_workers: int = 2  # encoder actors of that evaluation (0 = in the driver process)
    output: str = "runs/tune"  # sweep folder: Tune state, stage-1 cache, trials, table, plots, best config


@dataclass(frozen=True)
class LbrConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ib_gl: IBGLConfig = field(default_factory=IBGLConfig)
    gr_cl: GRCLConfig = field(default_factory=GRCLConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


STAGES = ("ib-gl", "gr-cl", "all", "lm")  # `lbr train --stage`
SPLIT_KEYS = ("normalized", "exact")  # data.split.key

CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_backend": ("dense", "flex", "kv_split"),
    "bottleneck.pooling": ("last", "mean"),
    "data.on_bad_record": ("error", "skip"),
    "ib_gl.target": ("self", "continuation", "pair"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "run.variant": ("lbr", "gl-cl", "cl"),
}
