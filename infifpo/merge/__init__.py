"""Merging checkpoints fine-tuned from one base: ``rsaf`` (the RSAF math, pure torch) and ``stage`` (`infifpo merge`
and ``merge_models``, on mergekit). Nothing is imported here, so ``infifpo.merge.rsaf`` needs torch alone."""
