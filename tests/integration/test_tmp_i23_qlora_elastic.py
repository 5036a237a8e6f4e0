from test_elastic_resume import MORE_CONFIGS, check_resumed_runs, train_elastic


def test_qlora_elastic_only(run_ranks, tmp_path):
    dirs, results, _ = train_elastic(run_ranks, tmp_path, {"qlora": MORE_CONFIGS["qlora"]}, bad_input=False)
    check_resumed_runs(dirs, results, "qlora")
