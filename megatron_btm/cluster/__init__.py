"""Unsupervised domains (c-BTM): cluster a corpus, split it by cluster, route by centroid distance.

- `text`: the word analyzer (tokens, numbers -> a placeholder, stop words) and corpus reading.
- `features`: tf-idf counts -> projection onto the SVD components -> L2 normalisation (numpy).
- `kmeans`: balanced assignment and the streamed balanced k-means (pure numpy).
- `artefact`: the saved clusters (JSON + .npz, no pickle), versioned.
- `fit`: `btm cluster fit` (streams the corpus; scikit-learn for tf-idf and SVD).
- `assign`: `btm cluster assign` (nearest centroid -> a corpus folder + report + heatmap).

Routing by cluster distance is `megatron_btm.routing.cluster` (loads the artefact, no sklearn).
"""
