"""`python -m launch CONFIG.yaml`: the YAML's `cluster:` section -> validated torchrun command on this node, a dry
run of every node's command, or an sbatch script. Importing this package must stay cheap (no torch): the log tee
(launch/tee.py) runs as its own small interpreter."""
