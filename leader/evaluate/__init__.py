"""Evaluation: every protocol of the paper on any representation.

    representations   run:RUN[:HEAD], teacher:NAME, concat:A+B  ->  features (n, d)
    items             the item table of a shard set (rows, kinds, splits, patients, labels)
    linear_probe      logistic probes per class, L2 grid selected on val, bootstrap CI; --ensemble average
    retrieval         diseased patch -> test images, cosine, precision@K
    anatomy           landmark patches: grouped kNN accuracy, k-means NMI, silhouette, t-SNE
    finetune          full fine-tuning of a backbone with a linear head
    compare           two-sample t-test on a protocol's primary metric
    report            markdown tables, figures and PASS/FAIL claims
    commands          `leader eval ...` and `leader report`
"""
