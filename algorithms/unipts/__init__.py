"""UniPTS (Xie et al., CVPR 2024) as a package, one module per part of the method (see `method`)."""

from algorithms.unipts.decoding import decode_genome, regrow_rates
from algorithms.unipts.dst import attach_dynamic_masks, current_masks, distill_sparse
from algorithms.unipts.method import UniPTS
from algorithms.unipts.objective import distillation_loss
from algorithms.unipts.search import SearchSettings, draw_fitness_set, genetic_search

__all__ = ["SearchSettings", "UniPTS", "attach_dynamic_masks", "current_masks", "decode_genome",
           "distill_sparse", "distillation_loss", "draw_fitness_set", "genetic_search", "regrow_rates"]
