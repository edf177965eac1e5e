"""autobuild: denoiser DAGs, the GNN sensitivity predictor, unit scores and budgeted configurations
(the second half of qua2sedimo). Entry points: ``autobuild.dag.family_dag``, ``autobuild.train.train_predictor``,
``autobuild.configs.build_config``, ``autobuild.report.build_report``."""
