"""The field's studies around the pipeline: attention (input-gradient saliency) and its model
registry, transferability scores, pretraining source candidates and their ranking, and the
validation of a ranking against grid results."""
