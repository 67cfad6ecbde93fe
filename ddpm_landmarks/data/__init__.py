"""Reading labelled and unlabelled x-rays: dataset readers and their registry, the one sample
type, image files (PNG / JPEG / 16-bit / DICOM), few-shot splits, landmark-exact transforms and
augmentation, and the image sets of pretraining (pools, exclusions, SSL views, curricula)."""
