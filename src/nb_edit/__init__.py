"""nb-edit: instruction-based image editing trained from feedback.

Implements three papers on one code path: NP-Edit (editing without pairs: VLM feedback plus
distribution matching, ``methods/npedit``), MT-EditFlow (multi-turn RL for editing,
``methods/mtrl``) and Multi-Reward as Condition (``methods/multireward``).

The package is cut into layers; a module imports only from its own layer or those listed before
it (``tests/test_layers.py`` checks it, docs/architecture.md draws it). The words the code uses
for each idea are listed once, in docs/glossary.md.
"""

__version__ = "0.1.0"

# Top to bottom: each layer may import the ones before it, never the ones after.
LAYERS = (
    "core",        # paths, config, runs, cache, images, validation, runtime
    "world",       # ShapesWorld: scenes, rendering, edits and their wording, the oracle
    "models",      # editors, text encoder, autoencoders, loaders, LoRA; vlm/ (the judge)
    "data",        # record schema, datasets on disk, curation, synthetic sets, sequences
    "flow",        # flow-matching schedule, samplers, shared losses, the edit pipeline
    "rewards",     # the judge as a reward: yes/no loss, scores, failure texts, multi-turn IF/CC
    "training",    # the one training loop and its checkpoints
    "evaluation",  # harness, statistics, claims, report
    "methods",     # npedit/, multireward/, mtrl/ (one folder per paper) and the run registry
    "standins",    # what `make pretrain` makes: teacher, supervised editors, judge
    "notebook",    # figures and widgets for the notebooks
    "bench",       # benchmarks against the plain way, the GPU check
    "cli",         # python -m nb_edit {run,train,pretrain,bench,report}
    "__main__",
)
