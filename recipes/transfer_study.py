"""Recipe: the paper's question as a study (engine/evaluate/transfer.py): SSL pretraining on an auxiliary atlas, fine-tuning on
shares of a labelled target, against the supervised baseline, over seeds.
`python recipes/transfer_study.py [--aux STORE --target STORE] [--label-shares 0.01,0.05,0.2,1] [--seeds 0,1,2,3,4]
[--out DIR]`; `--help` lists every setting. Writes records.json (every run) and summary.md (scores per share,
paired differences with t intervals) in --out; the synthetic atlas is the default data."""
from cellssl.engine.evaluate.transfer import main

if __name__ == "__main__":
    main()
