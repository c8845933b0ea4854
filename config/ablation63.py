# Sec. 6.3 ablation, on top of config/table62.py's scale (config/ablation63.sh passes both files):
#   python train.py config/table62.py config/ablation63.py --psu_lambda=0.05 --dtu_r=1.0   # "without DTU"
# The full system: PSU (psu_lambda), BAARA, DMU (keep 0.5 of the MLP units), DTU (keep 0.5 of
# each head's dimensions). BAARA's C_b from the FLOP ratio, so that the table reproduces bit for
# bit (--baara_cost=time measures it instead; on a busy CPU the step times jitter).
seed = 2026
baara = True
baara_cost = 'flops'
dmu_p = 0.5
dtu_r = 0.5
