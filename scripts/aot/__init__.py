"""Ahead-of-time compile check: every Triton kernel variant peftkern can launch, compiled for sm_80 and sm_90.

    python scripts/aot_check.py                       # both archs, one worker per core
    python scripts/aot_check.py --arch 90 --jobs 2 --json aot.json
    python scripts/aot_check.py --allow-spills        # report spills, fail only on errors/shared memory

No GPU is needed: Triton's own compiler and the ptxas it ships compile for an explicit target,
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`.

1. Record (aot/record.py, aot/driver.py; a child process, TRITON_INTERPRET=1). A driver calls peftkern's
   public ops on CPU tensors with the Triton backend, in both dispatch variants, forward and backward, in six
   dtype settings, enough calls that every flag, activation and tile-changing width is launched (`--full`:
   the cross product). The calls are each op family's own: every peftkern/<family>/ with an op.py declares
   them in its examples.py (aot_calls, run_aot_call); the driver finds the families and names none. It runs
   under the launch configuration of a GPU (peftkern.kernels._launch.LaunchConfig: the launchers pick their
   GPU tiles and warps, not the interpreter's small ones), twice: with split
   reductions aiming for 4 programs and for an H100's 4 x 132, since split counts, and Triton's ==1
   specialization of them, depend on the GPU's size. Each launch is intercepted where Triton would run it,
   described (tensor dtypes and 16-byte alignment; integers by Triton's own specialization: ==1, divisible
   by 16, 32/64-bit; constexprs) and NOT executed: recording needs the arguments, not the results.
2. Discover and check coverage (aot/discover.py). The kernels are those declared in peftkern.kernels.registry;
   every declared kernel must have been launched by the driver, and every bool constexpr with both values. A
   JIT function no kernel calls that is not declared, or a kernel module that reads the interpreter flag
   itself, is a problem too. A gap is a failure: the family's examples.aot_calls gains a call when a kernel or
   a flag is added.
3. Plan (aot/plan.py). Launches are bound with Triton's own binder for each arch and deduplicated: one compile
   per distinct (kernel, arch, argument types, constexprs, specialization attributes, options). Autotuned
   kernels: every config of the GPU autotuner, after its own `early_config_prune` when it has one.
4. Compile (aot/compile.py) in --jobs worker processes, in a fresh Triton cache deleted afterwards. Registers
   and spill bytes come from ptxas -v, shared memory from the kernel metadata. A compile's verdict is kept in
   a result cache outside the clone (--cache, --no-cache), keyed by the kernel's source and everything it
   calls, the specialization, Triton and ptxas.

Verdicts (the table's last columns; aot/report.py):
  ok                      compiled, no spills, shared memory within the arch's per-block limit
  SPILL                   ptxas spilled registers to local memory (a failure unless --allow-spills)
  SMEM>LIMIT              over the shared-memory limit in a launcher-fixed config, or in every config of
                          an autotuned specialization: the launch would fail on that GPU
  skipped by autotuner    an autotune config over the limit while another config of the same
                          specialization fits: Triton's autotuner skips it at run time (not a failure)
  COMPILE ERROR           triton.compile or ptxas failed (details after the table)
Exit status 0 when nothing failed, 1 otherwise (2 for bad arguments). The last line is the summary.
"""
