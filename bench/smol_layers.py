"""Layer sweep of an untrained backbone on STS-B dev retrieval (docs/smol-default.md section 1):
nDCG@10 of the last-token state of every layer, with and without the instruction on queries.

    python bench/smol_layers.py MODEL_DIR     # a saved full-depth Embedder folder, e.g. from
                                              # bench/smol_default.py --no-train --out DIR
"""
from pathlib import Path
import sys, torch
sys.path.insert(0, str(Path(__file__).parent))
from smol_default import stsb_dev, ndcg10, STS_INSTRUCTION

from tasks.models import Embedder, batch_by_length, format_query, pad_left
import torch.nn.functional as F
q, c, r = stsb_dev(Path('../shared/data/sts-en/stsbenchmark-train-dev.tsv'))
r=[{i} for i in r]
m = Embedder.load(sys.argv[1]); m.eval()
def enc(texts, ml):
    ids = m.token_ids(texts, ml); out=[None]*len(texts)
    with torch.inference_mode():
        for b in batch_by_length([len(x) for x in ids], 64):
            x, mask = pad_left([ids[i] for i in b], m.pad_id, m.device)
            hs = m.backbone(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states
            for k,i in enumerate(b): out[i]=torch.stack([F.normalize(h[k,-1].float(),dim=-1) for h in hs])
    return torch.stack(out).numpy()  # [n, L+1, H]
D = enc(c, 96); Q = enc([format_query(x, STS_INSTRUCTION) for x in q], 48); Q0 = enc(q, 48)
for l in range(1, D.shape[1]):
    print(l, round(ndcg10(Q[:,l], D[:,l], r),3), round(ndcg10(Q0[:,l], D[:,l], r),3), flush=True)
