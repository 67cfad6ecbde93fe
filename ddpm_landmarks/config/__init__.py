"""Typed configs: dataclasses loaded from YAML with dotted overrides, checked key by key.
Plain data: importing or loading a config imports neither torch nor diffusers.

    schema.py    load_config / save_config / from_dict / to_dict, the override syntax
    common.py    the sections every run shares (data, pools, few-shot, augment, heatmap, ...)
    training.py  optimiser, engine and logger sections of every training run
    pretrain.py  PretrainConfig (DDPM / SSL, probe, curriculum)
    finetune.py  FinetuneConfig (regressor, loss)
    classify.py  ClassifyConfig (labels, classifier)
"""
