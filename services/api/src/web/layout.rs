//! The page shell (head, navigation, sign-out form) and small shared pieces.

use maud::{html, Markup, DOCTYPE};
use tributary_projections::Phase;

use super::session::Session;

/// A whole page. Scripts and styles come from `/ui/static/` (embedded in the binary); the
/// content security policy allows nothing else.
pub fn page(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Tributary" }
                link rel="stylesheet" href=(super::assets::CSS_PATH);
                script src=(super::assets::JS_PATH) defer {}
            }
            body {
                header.top {
                    a.brand href="/ui/" { "Tributary" }
                    @if let Some(s) = session {
                        nav {
                            a href="/ui/" { "Projects" }
                            a href="/ui/agents" { "Agents" }
                            a href="/ui/usage" { "Usage" }
                        }
                        span.who title={"token " (s.who.name)} { (s.who.tenant) }
                        form.inline method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(s.csrf());
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A coloured status label.
pub fn badge(phase: Phase) -> Markup {
    html! { span class={"badge st-" (phase.name())} data-status=(phase.name()) { (phase.name().replace('_', " ")) } }
}

/// An exit code, or a dash while there is none.
pub fn exit_code(code: Option<i32>) -> Markup {
    match code {
        Some(0) => html! { span.exit.ok { "exit 0" } },
        Some(c) => html! { span.exit.fail { "exit " (c) } },
        None => html! { span.exit { "–" } },
    }
}

/// A message page (errors, not found).
pub fn message(title: &str, session: Option<&Session>, text: &str) -> Markup {
    page(
        title,
        session,
        html! {
            h1 { (title) }
            p.message { (text) }
            p { a href="/ui/" { "Back to the projects" } }
        },
    )
}
