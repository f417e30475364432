"""Real torchrun command lines, each with where it was found.

Each line is written as in its source, as one shell line (leading ``VAR=value`` words are the launcher's
environment), with these placeholders put in by the runner (``runner.expand``):

  {script}     the recording worker, tests/workers/recorder.py (absolute path), for the training script
  {module}     ``recorder``, for ``-m MODULE`` (every launcher runs in tests/workers, so it imports)
  {exe}        an executable wrapper that runs the recorder, for ``--no-python PROGRAM``
  {head}       127.0.0.1, for the head node's address ($MASTER_ADDR, $head_node_ip, ...)
  {hostname}   this host's name (``socket.gethostname()``), for ``$(hostname)``
  {port}       a free loopback port (fresh for each launcher run, one value for all nodes of a run), for a fixed port
  {node_rank}  0, 1, ... : the node's index, for ``--node_rank $SLURM_PROCID`` style values
  {log_dir}    an empty directory of this run, for ``--log-dir D``

Adaptations (``note``): worker counts are cut to what 2 CPU cores run quickly, fixed ports become free ports, host
addresses become loopback, ``$VARIABLES`` get the value shown. ``--nproc-per-node gpu`` lines are kept: this machine
has no GPU, so torchrun refuses them, and etcd-agent must refuse them too with a clear error.

``multinode``: the line describes a job of more than one node (``--nnodes`` maximum above 1) whose rendezvous
names no endpoint etcd-agent can serve etcd at (a static line), so etcd-agent gets ``--etcd-endpoints`` of the
session etcd added. A multi-node c10d line runs as written: the launcher that can bind its ``--rdzv-endpoint`` serves
the job's etcd there, as torchrun's serves its store. ``nodes``: how many launcher processes the runner starts for
it (all on 127.0.0.1).
"""

from __future__ import annotations

import dataclasses

TORCH_RUN_DOCS = "https://docs.pytorch.org/docs/stable/elastic/run.html"
TORCH_TEST_RUN = "pytorch/pytorch test/distributed/launcher/test_run.py"
TORCH_RUN_HELP = "pytorch/pytorch torch/distributed/run.py (get_args_parser help text)"


@dataclasses.dataclass(frozen=True)
class Line:
    label: str
    source: str
    cmd: str
    nodes: int = 1  # launcher processes to start
    multinode: bool = False  # etcd-agent needs --etcd-endpoints (a multi-node static line)
    expect: str = "works"  # what torchrun does here: "works" or "refused" (checked, so a broken line is seen)
    note: str = ""


CATALOG: tuple[Line, ...] = (
    # --- single node, the most common forms -----------------------------------------------------------------------
    Line("nanogpt-standalone-8", "karpathy/nanoGPT README.md",
         "torchrun --standalone --nproc_per_node=8 {script} config/train_gpt2.py"),
    Line("ddp-tutorial-nproc-gpu", "pytorch/examples distributed/ddp-tutorial-series/run_multigpu_torchrun.sh",
         "torchrun --standalone --nproc_per_node=gpu {script} 50 10", expect="refused",
         note="no GPU here: both must refuse, with a clear error"),
    Line("torch-docs-single-node", TORCH_RUN_DOCS + " (Single-node multi-worker)",
         "torchrun --standalone --nnodes=1 --nproc-per-node=2 {script} --arg1 value1",
         note="$NUM_TRAINERS=2"),
    Line("torch-docs-stacked-c10d-port0", TORCH_RUN_DOCS + " (Stacked single-node multi-worker)",
         "torchrun --rdzv-backend=c10d --rdzv-endpoint=localhost:0 --nnodes=1 --nproc-per-node=2 {script}",
         note="$NUM_TRAINERS=2"),
    Line("accelerate-python-m", "huggingface/accelerate examples/README.md",
         "python -m torch.distributed.run --nproc_per_node 2 {script}",
         note="'python -m torch.distributed.run can be used instead of torchrun'"),
    Line("accelerate-cv-example", "huggingface/accelerate examples/README.md",
         "torchrun --nproc_per_node 2 {script} --data_dir path_to_data"),
    Line("megatron-gpt3-static", "NVIDIA/Megatron-LM examples/gpt3/train_gpt3_175b_distributed.sh",
         "torchrun --nproc_per_node 2 --nnodes 1 --master_addr localhost --master_port {port} {script} "
         "--num-layers 96 --hidden-size 12288 --micro-batch-size 1 --fp16",
         note="GPUS_PER_NODE 8 -> 2, MASTER_PORT 6000 -> free port, model args shortened"),
    Line("megatron-wrap-dashed-static", "0-1CxH/megatron-wrap run.sh",
         "torchrun --nproc-per-node 2 --nnodes 1 --node-rank 0 --master-addr {hostname} --master-port {port} {script}",
         note="defaults: GPUS_PER_NODE 8 -> 2, MASTER_ADDR $(hostname), MASTER_PORT 22334 -> free port"),
    Line("ztomor-omp1-master-port", "JeMing-creater/ZTomorTrain run.sh",
         "OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_port {port} {script}",
         note="export OMP_NUM_THREADS=1; port 29550 -> free port"),
    Line("vista-omp16-standalone", "scout-op/CDVG VisTA/VisTA/run.sh",
         "OMP_NUM_THREADS=16 torchrun --standalone --nproc_per_node=2 --nnodes=1 {script}",
         note="export OMP_NUM_THREADS=16; --nproc_per_node=gpu -> 2 (no GPU here)"),
    Line("sngp-standalone-overrides-rdzv", "pkage/sngp-segmentation local_mpl_ddp.sh",
         "torchrun --rdzv-backend=c10d --rdzv-endpoint=localhost:0 --standalone --nnodes=1 --nproc-per-node=1 "
         "{script} --batch_size 4 --test_batch_size 4 --epochs 10 --warmup 10",
         note="one worker: no OMP_NUM_THREADS default"),
    # --- torchtitan: -m module, --tee 3, --role, --local-ranks-filter -------------------------------------------------
    Line("torchtitan-run-train", "pytorch/torchtitan run_train.sh",
         "PYTORCH_ALLOC_CONF=expandable_segments:True TORCHFT_LIGHTHOUSE=http://localhost:29510 "
         "torchrun --nproc_per_node=2 --rdzv_backend c10d --rdzv_endpoint=localhost:0 "
         "--local-ranks-filter 0 --role rank --tee 3 -m {module} --module llama3 --config llama3_debugmodel",
         note="NGPU=2, LOG_RANK=0"),
    Line("torchtitan-llama-static-endpoint", "pytorch/torchtitan run_llama_train.sh (early version)",
         "USE_LIBUV=1 torchrun --nproc_per_node=2 --rdzv_endpoint=localhost:{port} --local-ranks-filter 0 "
         "--role rank --tee 3 {script} --job.config_file ./train_configs/debug_model.toml",
         note="NGPU=2, LOG_RANK=0, port 5972 -> free port; static rendezvous at an explicit endpoint"),
    Line("torchtitan-8node-filter-no-tee", "pytorch/torchtitan run_8node.sh",
         "torchrun --nproc_per_node 2 --rdzv_backend c10d --rdzv_id 101 --rdzv_endpoint {head}:{port} "
         "--local-ranks-filter 0 {script} --job.config_file ./train_configs/llama2_70b.toml",
         note="run as written on one node (no --nnodes: 1); 8 workers -> 2; 10.140.60.12:29500 -> loopback"),
    # --- torch's own launcher tests ----------------------------------------------------------------------------------
    Line("torch-test-user-script", TORCH_TEST_RUN + " test_launch_user_script_python",
         "torchrun --nnodes=1 --nproc-per-node=4 --rdzv-id=1234 --monitor-interval=1 --start-method=spawn "
         "{script} --touch-file-dir=/tmp/compat-touch"),
    Line("torch-test-caffe2-bc", TORCH_TEST_RUN + " test_launch_user_script_python_caffe2_bc",
         "torchrun --nnodes=1 --nproc-per-node=4 --monitor-interval=1 --start-method=spawn --master-addr=localhost "
         "--master-port={port} --node-rank=0 {script} --touch-file-dir=/tmp/compat-touch"),
    Line("torch-test-no-python", TORCH_TEST_RUN + " test_launch_user_script_bash",
         "torchrun --nnodes=1 --nproc-per-node=4 --rdzv-id=1234 --monitor-interval=1 --start-method=spawn "
         "--no-python {exe} /tmp/compat-touch"),
    Line("torch-test-no-python-with-module", TORCH_TEST_RUN + " test_launch_user_script_bash",
         "torchrun --nnodes=1 --nproc-per-node=4 --rdzv-id=1234 --monitor-interval=1 --start-method=spawn "
         "--no-python --module {exe} /tmp/compat-touch", expect="refused",
         note="--no-python with --module is an error"),
    Line("torch-test-pet-env", TORCH_TEST_RUN + " test_launch_with_env_vars",
         "PET_NNODES=1 PET_NPROC_PER_NODE=4 PET_RDZV_ID=1234 PET_MONITOR_INTERVAL=1 PET_START_METHOD=spawn "
         "PET_NO_PYTHON=1 PET_MODULE=0 torchrun {exe} /tmp/compat-touch"),
    Line("torch-test-pet-env-module", TORCH_TEST_RUN + " test_launch_with_env_vars",
         "PET_NNODES=1 PET_NPROC_PER_NODE=4 PET_RDZV_ID=1234 PET_MONITOR_INTERVAL=1 PET_START_METHOD=spawn "
         "PET_NO_PYTHON=1 PET_MODULE=1 torchrun {exe} /tmp/compat-touch", expect="refused",
         note="PET_MODULE=1 with PET_NO_PYTHON=1 is an error"),
    Line("torch-test-nproc-auto", TORCH_TEST_RUN + " test_nproc_launch_auto_configurations",
         "torchrun --nnodes=1 --nproc-per-node=auto --rdzv-id=1234 --monitor-interval=1 --start-method=spawn "
         "--no-python {exe} /tmp/compat-touch", note="no accelerator: one worker per CPU"),
    Line("torch-test-nproc-unknown", TORCH_TEST_RUN + " test_nproc_launch_unknown_configurations",
         "torchrun --nnodes=1 --nproc-per-node=unknown --rdzv-id=1234 --monitor-interval=1 --start-method=spawn "
         "--no-python {exe} /tmp/compat-touch", expect="refused"),
    Line("torch-test-elastic-one-of-two", TORCH_TEST_RUN + " test_launch_elastic",
         "torchrun --nnodes=1:2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=localhost:{port} "
         "--rdzv-conf='join_timeout=5,last_call_timeout=1,timeout=5' --rdzv-id=1234 --monitor-interval=1 "
         "--start-method=spawn {script} --touch-file-dir=/tmp/compat-touch",
         note="an elastic 1:2 job on one node: it starts after the last call; etcd-agent serves etcd at the endpoint"),
    Line("torch-test-standalone", TORCH_TEST_RUN + " test_launch_standalone",
         "torchrun --nnodes=1 --nproc-per-node=4 --standalone --monitor-interval=1 --start-method=spawn "
         "{script} --touch-file-dir=/tmp/compat-touch"),
    Line("torch-test-run-path", TORCH_TEST_RUN + " test_is_torchelastic_launched",
         "torchrun --run-path --nnodes=1 --nproc-per-node=1 --monitor-interval=1 {script} "
         "--out-file=/tmp/compat-out", note="--run-path runs the script in a multiprocessing child through runpy"),
    Line("torch-test-capture-logs-prefix", TORCH_TEST_RUN + " test_capture_logs_using_default_logs_specs",
         "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE='[rank${rank}]: ' torchrun --nnodes=1 --nproc-per-node=4 "
         "--rdzv-id=1234 --redirect=3 --tee=3 --monitor-interval=1 --start-method=spawn --no-python {exe} "
         "/tmp/compat-touch", note="--redirect is argparse's abbreviation of --redirects"),
    Line("torch-test-virtual-local-rank", TORCH_TEST_RUN + " test_virtual_local_rank",
         "torchrun --nnodes=1 --nproc-per-node=2 --rdzv-id=1234 --monitor-interval=1 --start-method=spawn "
         "--redirect=3 --tee=3 --virtual-local-rank {script}"),
    # --- flags documented in torch's help text --------------------------------------------------------------------
    Line("torch-help-redirects-log-dir", TORCH_RUN_HELP + " --redirects '[-r 3]', --log-dir",
         "torchrun --nproc-per-node=2 --redirects 3 --log-dir {log_dir} {script}"),
    Line("torch-help-redirects-map", TORCH_RUN_HELP + " --redirects '[-r 0:1,1:2]'",
         "torchrun --nproc-per-node=2 -r 0:1,1:2 --log-dir {log_dir} {script}"),
    Line("torch-help-tee-map", TORCH_RUN_HELP + " --tee (--redirects format)",
         "torchrun --nproc-per-node=2 --tee 0:3,1:1 {script}"),
    Line("torch-help-signals-slurm", TORCH_RUN_HELP + " --signals-to-handle (SIGUSR1 for SLURM)",
         "torchrun --nproc-per-node=2 --signals-to-handle=SIGTERM,SIGUSR1 {script}"),
    Line("argparse-util-env-vs-flag", "pytorch/pytorch torch/distributed/argparse_util.py (env docstring)",
         "PET_NPROC_PER_NODE=4 torchrun --nproc-per-node=2 {script}", note="the flag wins over PET_*"),
    # --- multi-node: two launchers on 127.0.0.1; a c10d line as written, a static one with --etcd-endpoints added ---
    Line("nanogpt-two-node-static", "karpathy/nanoGPT README.md",
         "torchrun --nproc_per_node=2 --nnodes=2 --node_rank={node_rank} --master_addr={head} --master_port={port} "
         "{script}", nodes=2, multinode=True,
         note="8 workers per node -> 2; 123.456.123.456:1234 -> loopback, free port"),
    Line("accelerate-two-node-c10d", "huggingface/accelerate examples/README.md",
         "torchrun --nproc_per_node 2 --nnodes 2 --rdzv_id 2299 --rdzv_backend c10d --rdzv_endpoint {head}:{port} "
         "{script}", nodes=2, note="master_node_ip_address:29500 -> loopback, free port"),
    Line("torch-docs-fault-tolerant", TORCH_RUN_DOCS + " (Fault tolerant)",
         "torchrun --nnodes=2 --nproc-per-node=2 --max-restarts=3 --rdzv-id=job42 --rdzv-backend=c10d "
         "--rdzv-endpoint={head}:{port} {script}", nodes=2,
         note="$NUM_NODES=2, $NUM_TRAINERS=2, $JOB_ID=job42, $HOST_NODE_ADDR=loopback:free port"),
    Line("torch-docs-fault-tolerant-hostname", TORCH_RUN_DOCS + " (Fault tolerant)",
         "torchrun --nnodes=2 --nproc-per-node=2 --max-restarts=3 --rdzv-id=job43 --rdzv-backend=c10d "
         "--rdzv-endpoint={hostname}:{port} {script}", nodes=2,
         note="as above with $HOST_NODE_ADDR=$(hostname):free port: the host's own name"),
    Line("torch-test-elastic-two-agents", TORCH_TEST_RUN + " test_launch_elastic_multiple_agents",
         "torchrun --nnodes=1:2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=localhost:{port} "
         "--rdzv_conf=timeout=5 --rdzv-id=4711 --monitor-interval=1 --start-method=spawn {script} "
         "--touch-file-dir=/tmp/compat-touch", nodes=2, note="4 workers per node -> 2"),
)

BY_LABEL = {line.label: line for line in CATALOG}
assert len(BY_LABEL) == len(CATALOG), "duplicate labels in the catalog"
