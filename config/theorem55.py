# Theorem 5.5 at CPU scale (shared settings; the sweep sets n_sentences, psu_lambda, psu_channels):
#   python train.py config/table62.py config/theorem55.py --n_sentences=2000
# A richer synthetic corpus than the default: 256 templates, flatter Zipf weights (0.8) and word
# classes 16x larger (6.3k words), so that the distinct training sentences carry little of the true
# probability mass (1.1%, 2.5% and 5.4% at 2k, 20k and 150k sentences; the default corpus: 40-65%).
# A model that learned the language then rarely repeats a training sentence; one that memorised does.
synthetic_modes = 256
synthetic_zipf = 0.8
synthetic_class_scale = 16
seed = 2026
