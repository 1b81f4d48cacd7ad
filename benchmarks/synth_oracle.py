import sys, numpy as np
from scipy import ndimage as ndi
from sklearn.metrics import roc_auc_score
from ctvlab.config import SynthConfig
from ctvlab.synth.clinical import draw_cohort
from ctvlab.synth.patient import patient_streams, template_units
from ctvlab.synth.anatomy import growth_grid
from ctvlab.synth.tumour import simulate_tumour, pre_rt_regions
cfg=SynthConfig(n_patients=101, seed=0)
plans=draw_cohort(cfg)
g=growth_grid(3.0)
ys, ds, us = [], [], []
per=[]
for p in plans[:int(sys.argv[1])]:
    if p.progression_type=="CEL": continue
    spec=template_units(p.tumour, p.brain_scale)
    c=simulate_tumour(spec, g, patient_streams(0, p.index)["tumour"])
    pre=pre_rt_regions(c.u_pre, c.depth_mm, spec, c.gtr_density, c.oedema)
    brain=g.brain>=0.5
    dist=ndi.distance_transform_edt(~pre["t2l"], sampling=3.0)
    nav=brain & ~pre["t2l"] & ~pre["cavity"] & (dist<=40)
    y=(c.u_prog>=spec.t2l_density)[nav]
    if y.sum()==0 or y.all(): continue
    ys.append(y); ds.append(-dist[nav]); us.append(c.u_pre[nav])
    per.append((roc_auc_score(y,-dist[nav]), roc_auc_score(y, c.u_pre[nav])))
y=np.concatenate(ys); print("pooled AUC distance %.3f  true u_pre %.3f  n=%d"%(roc_auc_score(y,np.concatenate(ds)), roc_auc_score(y,np.concatenate(us)), len(ys)))
print("per-patient mean distance %.3f u %.3f"%tuple(np.mean(per,0)))
