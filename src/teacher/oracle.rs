//! SynthClinic's oracle as a teacher: exact knowledge of the world, wrong
//! on its noisy items, with a screening that flags some of them.

use super::{Teacher, TeacherError, Verdict};
use medzero_envs::synthclinic::Oracle;
use medzero_envs::{Problem, Step};

pub struct OracleTeacher(pub Oracle);

/// The oracle knows SynthClinic questions only: any other is no malformed
/// reply but a question it cannot be asked, so the stage stops.
fn unknown(e: impl std::error::Error + Send + Sync + 'static) -> TeacherError {
    TeacherError::Unavailable(e.into())
}

impl Teacher for OracleTeacher {
    fn name(&self) -> String {
        "oracle".into()
    }

    fn explain(&self, p: &Problem) -> Result<String, TeacherError> {
        Ok(self.0.explain(p).map_err(unknown)?.render(p))
    }

    fn screen(&self, p: &Problem) -> Result<bool, TeacherError> {
        self.0.screen(p).map_err(unknown)
    }

    fn correct(&self, p: &Problem, attempt: &[Step]) -> Result<Vec<Step>, TeacherError> {
        self.0.correct(p, attempt).map_err(unknown)
    }

    fn judge(&self, p: &Problem, response: &str) -> Result<Verdict, TeacherError> {
        Ok(if self.0.judge(p, response) {
            Verdict::Correct
        } else {
            Verdict::Wrong
        })
    }

    fn answer(&self, p: &Problem) -> Result<String, TeacherError> {
        let letter = self.0.explain(p).map_err(unknown)?.letter;
        Ok(p.option(&letter)
            .map(|c| c.text.clone())
            .unwrap_or_default())
    }
}
