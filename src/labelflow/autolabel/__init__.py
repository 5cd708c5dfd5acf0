"""Autolabel: grow a labelled set from a few human labels and a pile of unlabelled images.

The loop is driven by Snakemake checkpoints (workflow/rules/autolabel.smk):

* :mod:`.prepare` scans ``clean`` (class folders) and ``raw`` (any nesting) into the human and
  raw tables under one autolabel root;
* :mod:`.round` writes round r's training table, and after the round's run has trained on it,
  predicts the still-unlabelled images, calibrates and applies the policy;
* :mod:`.policy` is the pure acceptance decision (confidence, neighbours, class cap) and the
  round's :class:`~labelflow.autolabel.policy.RoundSettings`;
* :mod:`.results` assembles the labelled dataset, plots progress, checks it against a truth
  table and materialises it as a folder tree.
"""
