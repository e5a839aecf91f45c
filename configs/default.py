"""Default configuration: declares every field (docs/method.md values).

Dataset configs (synthia.py, gta5.py, demo.py, test.py) import this and
override only what differs, so `lock_config` rejects misspelt keys.
"""

import ml_collections

from plca_jax import methods


def domain(name, root="", split="train", *, require_labels=True,
           synthetic_domain="source", num_images=0):
  """One dataset of the data config (source, target or eval)."""
  return ml_collections.ConfigDict(dict(
      name=name,  # synthia | cityscapes | cityscapes_tfds | gta5 | synthetic
      root=root,  # dataset directory (docs/datasets.md, "Datasets")
      split=split,  # Cityscapes split; synthetic: "train" or "val"
      # Fail when labels are missing; False reads them only if present
      # (the unlabelled target stream).
      require_labels=require_labels,
      domain=synthetic_domain,  # synthetic only: "source" or "target"
      num_images=num_images))  # synthetic only


def use_synthetic_domains(config, *, num_train, num_eval, height, width):
  """Source/target/eval from the procedural domains (plca_jax.data.synthetic).

  The target stream is unlabelled; evaluation uses held-out target scenes
  (the "val" split), at full resolution.
  """
  config.data.source = domain("synthetic", synthetic_domain="source",
                              num_images=num_train)
  config.data.target = domain("synthetic", synthetic_domain="target",
                              num_images=num_train, require_labels=False)
  config.data.eval = domain("synthetic", split="val",
                            synthetic_domain="target", num_images=num_eval)
  config.data.synthetic_height, config.data.synthetic_width = height, width
  config.data.eval_image_size = (height, width)
  config.data.eval_label_size = (height, width)


def use_paper_setting(config, source, num_classes, train_epochs,
                      horizon_epochs):
  """X -> Cityscapes as in the paper: R101, ImageNet backbone
  (docs/method.md, Optimisation)."""
  config.model.depth = 101
  config.model.num_classes = num_classes
  config.data.source = domain(source)
  config.data.target = domain("cityscapes", split="train",
                              require_labels=False)
  config.data.eval = domain("cityscapes", split="val")
  config.init_allow_missing = "classifier"
  # R101 at 730x730: 3.04 GiB kept for the backward pass per micro-batch of
  # 1 image per domain instead of 11.83 GiB (benchmarks/memory.py), so a
  # micro-batch of 5 per domain fits a 16 GiB device. "block_keep_3x3"
  # keeps 3.59 GiB and recomputes less (an update ~6% faster on a CPU);
  # see resnet.ResNet.remat.
  config.model.remat = "block"
  # The paper's update (2 micro-batches of 4 images per domain) on any
  # device count: plca_jax.schedule.resolve.
  config.train.auto_split = True
  set_epochs(config, train_epochs, horizon_epochs)
  # The release's effective Lovasz weight for the update's size: 3.0 for
  # its README's 2-GPU launch (release_lovasz_weight).
  config.loss.lovasz_weight = release_lovasz_weight(images_per_update(config))


def use_baseline_setting(config, method, source, *, num_steps,
                         schedule_steps):
  """A DeepLab-V2 R101 baseline's paper setting (AdaptSegNet, FDA).

  As their code bases train: batch 1 per domain, heads at 10x the learning
  rate, no flips, 512x1024 inputs (one crop size for both domains here),
  evaluation at 512x1024 without test-time aggregation.
  """
  classes = {"gta5": 19, "synthia": 16}
  if source not in classes:
    raise ValueError(f"config argument {source!r}; expected one of "
                     f"{sorted(classes)}")
  config.method = method
  use_paper_setting(config, source, num_classes=classes[source],
                    train_epochs=1, horizon_epochs=1)
  config.train.batch_size = 1
  config.train.grad_accum_steps = 1
  config.train.num_steps = num_steps
  config.optim.schedule_steps = schedule_steps
  config.optim.head_lr_mult = 10.0
  config.data.resize_min = config.data.resize_max = 512
  config.data.crop_size = (512, 1024)
  config.data.flip_prob = 0.0
  config.data.eval_image_size = (512, 1024)
  config.eval.aggregate = False
  config.model.head_init = "normal_0.01"  # their DeepLab's classifier init
  config.train.checkpoint_every = 5000
  config.train.eval_every = 5000


CITYSCAPES_TRAIN_IMAGES = 2975  # the target set an epoch goes through
# The release's README launch: 2 GPUs, a global micro-batch of 4 images per
# domain, 2 micro-batches per update.
RELEASE_GPUS = 2
RELEASE_MICRO_BATCH = 4


def images_per_update(config):
  """batch_size x grad_accum_steps, as a reference that follows overrides."""
  return (config.train.get_ref("batch_size") *
          config.train.get_ref("grad_accum_steps"))


def release_lovasz_weight(images, paper_weight=0.75):
  """beta1 relative to the averaged CE, as the release effectively trains.

  Per optimizer update the release averages every other term over its K
  accumulated micro-batches but sums the Lovasz term (x K), and its
  multi-GPU Lovasz multiplies by the world size W while DDP averages the
  other terms over the GPUs (x W): beta1 = 0.75 x W x K, i.e. 3.0 on its
  README's 2-GPU launch with K = 2. An update of `images` per domain is
  that launch with K = images / 4 (docs/method.md, "Losses").

  Args:
    images: images per domain per update (a number or a field reference).
    paper_weight: beta1 as the paper states it.
  """
  if hasattr(images, "to_float"):
    images = images.to_float()
  return images * (paper_weight * RELEASE_GPUS / RELEASE_MICRO_BATCH)


def set_epochs(config, train_epochs, horizon_epochs):
  """Training length and poly horizon in epochs of the target set.

  An epoch is ceil(|Cityscapes train| / images per update) updates, as in
  the release; both counts follow later changes of the batch (command-line
  overrides, plca_jax.schedule.resolve) until set explicitly.
  """
  epoch = -(-CITYSCAPES_TRAIN_IMAGES // images_per_update(config))
  config.train.num_steps = train_epochs * epoch
  config.optim.schedule_steps = horizon_epochs * epoch


def get_config():
  """Returns the default ConfigDict."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # The training method (plca_jax/methods): "plca", or a baseline. Each
  # method with options has its block `config.<method>` (below); PLCA's
  # losses are `config.loss`.
  config.method = "plca"
  # Initial weights: a plca_jax workdir or a directory written by
  # `python -m plca_jax.convert`; empty = random initialisation.
  config.init_from = ""
  # Regex of parameter paths allowed to keep their initial values when
  # `init_from` lacks them (e.g. "classifier" for an ImageNet backbone).
  config.init_allow_missing = ""

  config.model = ml_collections.ConfigDict()
  config.model.name = "deeplab_v2"
  config.model.depth = 101  # ResNet-18/34/50/101 backbone
  config.model.width = 64  # stem/layer1 channels (64 = standard ResNet)
  config.model.num_classes = 16
  # "block": recompute each residual block's activations in the backward
  # pass (the forward keeps only block inputs): R101 at 730x730 keeps
  # ~4x less for the backward pass (benchmarks/memory.py,
  # docs/performance.md). "block_keep_3x3": the same, but each block keeps
  # its 3x3 convolution's output too (recomputes the cheap 1x1 convs only;
  # +18% memory, -6% time against "block" for R101). "none": keep
  # everything (fastest on small inputs).
  config.model.remat = "none"
  # Where a bottleneck strides: "1x1" (the first conv: Caffe / DeepLab-V2,
  # the release's ImageNet initialisation) or "3x3" (torchvision's ResNets).
  # Must match the weights of `init_from` (checked before training).
  config.model.stride_on = "1x1"
  # The residual blocks after the first of each layer: "scan" (one lax.scan
  # over their stacked variables: the compiler generates one block's
  # kernels per layer), "unroll" (one copy per block), or "auto": scan in
  # TPU programs (a shorter compile), unroll in GPU and CPU ones
  # (docs/performance.md). The results and the variables are the same
  # either way.
  config.model.scan_blocks = "auto"
  # The ASPP head's four dilated convs: "conv" (four convolutions),
  # "product" (one matrix product and shifted adds, the same sums), "taps"
  # (one product per tap, batched, and shifted adds), or "auto": the
  # product in CPU programs (XLA:CPU runs the convolutions slowly), the
  # taps in TPU ones (libtpu takes minutes to compile each convolution),
  # the convolutions in GPU ones (cuDNN) (docs/performance.md). The
  # variables are the same.
  config.model.head_form = "auto"
  # The head's initialisation (models.deeplab_v2.HEAD_INITS): the PLCA
  # release leaves its ASPP convs at PyTorch's default ("torch_default");
  # AdaptSegNet and FDA draw them from N(0, 0.01) ("normal_0.01").
  config.model.head_init = "torch_default"

  # docs/method.md, Losses. The ablation ladder of the paper's Table 1 is
  # use_ce; +use_lovasz; +use_fass; +use_cass; +use_lsr.
  # docs/method.md, Data and Evaluation.
  config.data = ml_collections.ConfigDict()
  config.data.source = domain("synthia")
  config.data.target = domain("cityscapes", split="train",
                              require_labels=False)
  config.data.eval = domain("cityscapes", split="val")
  config.data.resize_min = 760  # random shorter edge, inclusive range
  config.data.resize_max = 988
  config.data.flip_prob = 0.5
  config.data.crop_size = (730, 730)  # (height, width)
  config.data.encoding = "bgr_mean"  # or "rgb_imagenet"; done on device
  # Grayscale network input (luma on 3 channels, before the encoding), in
  # training, evaluation and the tools: pixel_contrast's stage 1.
  config.data.grayscale = False
  config.data.eval_image_size = (730, 1460)  # network input (H, W)
  config.data.eval_label_size = (1024, 2048)  # labels stay at full size
  # grain worker processes; 0 = in-process with grain's read threads, the
  # fastest on small hosts (docs/datasets.md, "Input pipeline").
  config.data.num_workers = 0
  config.data.read_threads = 4  # in-process grain reader threads
  config.data.prefetch_batches = 8  # batches read ahead
  # Source/target pairing (plca_jax/data/pairing.py): "random" (the
  # release) or "class_overlap": the best of pairing_candidates source
  # images by classes shared with the target's predicted ("pseudo") or,
  # for analysis on synthetic data, labelled ("labels") class set.
  config.data.pairing = "random"
  config.data.pairing_candidates = 4
  config.data.pairing_target_classes = "pseudo"
  config.data.pairing_min_share = 0.01  # of the output grid, for "pseudo"
  config.data.on_error = "raise"  # or "skip" unreadable files (counted)
  config.data.synthetic_height = 128
  config.data.synthetic_width = 256
  config.data.synthetic_seed = 0

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 4  # global, per domain, per micro-batch
  config.train.grad_accum_steps = 2  # micro-batches per update
  # When the batch does not split over the devices: True keeps the images
  # per update with other micro-batches, or on more devices than images
  # trains one image per device with a scaled learning rate
  # (plca_jax.schedule); False stops with an error.
  config.train.auto_split = False
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.train.eval_every = 1000
  config.train.keep_checkpoints = 3
  # JAX's persistent compilation cache: "workdir" (WORKDIR/compilation_cache),
  # a directory (local or gs://), or "" (none). A resumed run (after a
  # preemption, say) then loads its compiled programs instead of compiling
  # them again: minutes for the paper configs' update on TPU
  # (python -m plca_jax.aot reports the compile time per target). A cache
  # already set (JAX_COMPILATION_CACHE_DIR) is kept.
  config.train.compilation_cache = "workdir"
  # Profile this many updates from `profile_first_step` on (0 = off): a
  # jax.profiler trace in WORKDIR/plugins/profile for TensorBoard's profile
  # tab (docs/training.md).
  config.train.profile_steps = 0
  config.train.profile_first_step = 10
  # Network compute dtype: "float32" or "bfloat16". Parameters, optimizer
  # state and BatchNorm statistics stay float32; the losses (association
  # similarities included) are computed in float32 from the network outputs.
  config.train.compute_dtype = "float32"
  # glibc keeps freed host memory for reuse and CPU computations run in the
  # calling thread (plca_jax.xla.keep_freed_host_memory), set by
  # plca_jax.main before the first device use: XLA:CPU otherwise page-faults
  # each update's temporary buffers in afresh (the R101 update at 321x321
  # is about 1.4x faster with it: benchmarks/step.py --host_memory=keep vs
  # default). Host RSS stays at its peak.
  config.train.keep_freed_host_memory = True
  # How an update runs its micro-batches: "loop" (a Python loop: K copies
  # of the forward and backward pass in the program), "scan" (lax.scan:
  # one copy) or "auto": the loop in CPU programs (XLA:CPU ran the demo's
  # update 3x slower as a scan), the scan on TPU and GPU (compile time).
  config.train.micro_batch_loop = "auto"
  # CPU backend only: the run's global number of CPU devices, split evenly
  # over its processes (plca_jax.main sets it before the first device use;
  # 0 = XLA's default, one per process). The device count fixes the SPMD
  # program and with it the order of every float reduction across the
  # batch, so with the same value one process and N processes log the same
  # losses bit for bit (docs/scaling.md, "Reproducibility"); different
  # device counts
  # agree only up to reduction order.
  config.train.cpu_devices = 0
  # True: methods that train on source and target images (PLCA,
  # AdaptSegNet, LDR) send both domains through the network as one batch of
  # 2B images with per-domain BatchNorm groups (methods.base.forward_pair):
  # the same outputs, gradients and running statistics as two passes
  # (docs/method.md, Network) up to float rounding. Off by default: the
  # full R101 update was not measurably faster on a CPU
  # (benchmarks/step.py --one_pass=both).
  config.train.domains_in_one_pass = False

  config.optim = ml_collections.ConfigDict()
  config.optim.base_lr = 2.5e-4
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4  # L2 added to the gradients
  config.optim.head_lr_mult = 1.0
  config.optim.poly_power = 0.9
  # SYNTHIA -> Cityscapes: 8 epochs of updates over the Cityscapes train
  # images (train.num_steps), poly horizon (optim.schedule_steps) 10 epochs.
  set_epochs(config, 8, 10)

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 2  # global
  config.eval.aggregate = True  # test-time spatial aggregation
  config.eval.alpha = 0.5
  config.eval.num_images = 3  # prediction images written per evaluation

  config.loss = ml_collections.ConfigDict()
  config.loss.use_ce = True
  config.loss.use_lovasz = True
  config.loss.use_fass = True
  config.loss.use_cass = True
  config.loss.use_lsr = True
  config.loss.aggregate_target = True  # spatial aggregation, eq. 7-8
  config.loss.sim_plca = False  # "Sim-PLCA" variant of the association
  # The paper states beta1 = 0.75; the release sums its Lovasz term over 2
  # accumulated micro-batches while averaging the others, i.e. an effective
  # 0.75 * 2 = 1.5, which is what reproduces its numbers.
  config.loss.lovasz_weight = 1.5
  config.loss.association_weight = 0.1
  config.loss.lsr_weight = 0.01
  config.loss.lsr_lambda = 10.0
  config.loss.alpha = 0.5  # spatial aggregation blend
  config.loss.ignore_label = 255
  # How the Lovasz term sorts its errors: "auto" (NumPy through a host
  # callback on one CPU device, where it is about 5x faster than XLA:CPU's
  # sort; XLA's sort elsewhere), "host" or "xla". A program with the host
  # callback is never written to JAX's persistent compilation cache; "xla"
  # makes the update cacheable (the tests use it: configs/test.py).
  config.loss.lovasz_sort = "auto"
  # Similarity rows alive at once in the association (None: all). 256 keeps
  # a 730x730 image pair at ~1.2 GB of buffers instead of ~6.6 GB, and is
  # no slower (benchmarks/association.py, docs/performance.md).
  config.loss.chunk_size = 256
  # ... for images of more grid pixels than this (730x730: 8464); smaller
  # ones run unchunked, where the whole (L x L) matrices are small and one
  # chunk is faster (benchmarks/association.py --size=41
  # --chunk_sizes=none,256: unchunked is faster up to about 48x48 grids).
  config.loss.chunk_above_pixels = 2048
  # Precision of the association's and aggregation's float32 matrix
  # products on TPU and GPU: "highest" (float32), "high" (TPU: three
  # bfloat16 passes) or "default" (TPU: one bfloat16 pass, GPU: TF32).
  # With bfloat16-rounded inputs the association picks another target
  # pixel for a share of source pixels (benchmarks/association_precision.py,
  # docs/method.md, Deviations). CPUs compute in float32.
  config.loss.association_precision = "highest"

  # The other methods' blocks, declared by their modules.
  for name, block in methods.default_configs().items():
    config[name] = block
  return config
