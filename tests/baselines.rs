//! SynthClinic needs reasoning: answering without the KB stays near chance,
//! while the oracle's chains score 100% under the strict verifier.

use medzero::eval::baselines::{
    self, GoldChain, MostFrequentLetter, RandomOption, TeacherAnswers, WordOverlap,
};
use medzero::teacher::OracleTeacher;
use medzero_envs::synthclinic::{OracleConfig, SynthClinic, SynthConfig};

#[test]
fn shortcuts_stay_near_chance_and_gold_chains_score_100() {
    for (options, hops) in [(4, 1), (5, 2)] {
        let cfg = SynthConfig {
            seed: 21,
            train: 1000,
            test: 2000,
            options,
            hops,
            ..Default::default()
        };
        let w = SynthClinic::generate(&cfg).unwrap();
        let chance = 1.0 / options as f64;
        // 2000 items: the standard error at chance is about 1 point.
        let near_chance = |name: &str, acc: f64| {
            assert!(
                (acc - chance).abs() < 0.05,
                "{name} scored {acc:.3} with {options} options (chance {chance:.3})"
            );
        };
        near_chance(
            "most-frequent-letter",
            baselines::score(&mut MostFrequentLetter::fit(&w.train), &w.test).accuracy,
        );
        near_chance(
            "word-overlap",
            baselines::score(&mut WordOverlap, &w.test).accuracy,
        );
        near_chance(
            "random-option",
            baselines::score(&mut RandomOption::new(1), &w.test).accuracy,
        );
        let oracle = OracleTeacher(w.oracle(OracleConfig::default()));
        let gold = baselines::score(&mut GoldChain(&w.truth()), &w.test);
        assert_eq!(gold.accuracy, 1.0);
        assert_eq!(gold.per_task.len(), 3);
        assert_eq!(
            baselines::score(&mut TeacherAnswers(&oracle), &w.test).accuracy,
            1.0
        );
    }
}
