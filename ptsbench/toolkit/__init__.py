"""The toolkit a method may import: the shared mechanics of pruning, each written once.

    sparsity      prunable layers, the split of a global target across them, exact counting
    patterns      unstructured and N:M patterns: which weights compete for the kept slots
    allocation    the allocation axis as methods use it (a registry strategy, or a file another job wrote)
    allocations/  the allocation registry (uniform, erk, global, global_l2norm, owl): one module each
    scores/       the score registry (magnitude, random, wanda, ria): one module each
    owl           OWL's per-layer rates from the outlier share of Wanda scores
    dsnot         DSnoT's training-free prune-and-grow refinement of a mask
    layerwise     layer-by-layer calibration passes (dense, sequential, sequential+bn protocols)
    reconstruct   layer and block reconstruction of a pruned network against the dense one
    bn, bnfold    BatchNorm re-estimation on the calibration set; folding BN into conv + bias (POT)
    distill       knowledge-distillation losses and block discovery
    compiled      optional torch.compile of weight-sized elementwise chains (the `compile` key)

The job path (ptsbench.cli -> ptsbench.runner) builds the model, the data and the method and audits
what comes back; ptsbench.analysis reads the records. Methods (algorithms/) import this package, the
contract (algorithms.base, algorithms.oneshot, algorithms.scored) and the few modules shared with the job
path (data, evaluate, train, streams, settings, paths, errors); tests/test_layers.py holds them to it.
"""
